# SPDX-License-Identifier: Apache-2.0
"""The inputs of ``kvbridge bench chaos --fuzz``: what to send, what may come back.

Each input is a ``Case``: what to send on one fresh TCP connection to a
producer's control listener (raw bytes, or an interactive handshake followed by
bytes), and the set of outcome labels (see ``kvbridge.bench.fuzz_wire``) a
correct producer may answer with. Inputs are a pure function of ``(seed,
index)`` (``make_case``), so any single input can be replayed without running
the ones before it; the client nonce comes from the same RNG, only the
producer's nonce (and so the MAC) differs between runs.

Message classes are taken from ``kvbridge.protocol`` by reference (the
``Message`` union, ``PROTOCOL_VERSION``), so a new message type or version is
fuzzed without editing this file.
"""

from __future__ import annotations

import random
import typing
from dataclasses import dataclass

import msgspec

from kvbridge import protocol as P
from kvbridge.layout import MEMORY_LAYOUTS, KVLayout

#: Input classes; input ``i`` belongs to ``CLASSES[i % len(CLASSES)]`` (equal shares).
CLASSES = ("random", "mutated", "truncated", "oversized", "version", "auth", "layout",
           "post_handshake")
#: Messages a producer accepts on a consumer connection after the handshake;
#: every other message type there is a protocol error. Names, not classes, so
#: a message this version of ``protocol`` lacks (``Release``) is simply absent.
ACCEPTED_AFTER_HANDSHAKE = ("Pull", "ReadDone", "Release")
#: Anything a producer may say to a malformed pre-handshake input.
PRE_AUTH_REFUSALS = frozenset({"error:protocol", "error:version", "error:auth", "closed"})


@dataclass(frozen=True)
class Target:
    """What the fuzzer knows about the producer (as a real consumer would)."""

    backend: str
    layout: KVLayout
    secret: bytes
    #: ``Handshake.info`` a real consumer of this backend sends
    info: dict
    #: a published request the fuzzer may be granted (never reads it to the end)
    decoy: str
    decoy_blocks: tuple[int, ...]
    num_blocks: int


@dataclass
class Shake:
    """An interactive handshake: Hello, read the Challenge, then Handshake."""

    #: ok | wrong_secret | empty | random | truncated | reflected | stale | flipped | extended
    mac: str = "ok"
    layout: KVLayout | None = None
    backend: str | None = None
    info: dict | None = None
    #: read (and verify) HandshakeAccept before sending ``Case.payload``
    wait_accept: bool = True
    #: send this instead of the Handshake (e.g. a second Hello)
    replace: bytes | None = None

    def describe(self, target: Target) -> str:
        """Short, for replay output: how this handshake differs from a valid one."""
        if self.replace is not None:
            return f"Hello, then {self.replace[:16].hex()}... instead of a Handshake"
        out = [f"mac {self.mac}"]
        if self.layout is not None:
            out.append("layout differs: " + ", ".join(
                f"{k}={getattr(self.layout, k)!r}" for k in self.layout.__struct_fields__
                if getattr(self.layout, k) != getattr(target.layout, k)))
        if self.backend is not None:
            out.append(f"backend {self.backend!r}")
        if self.info is not None:
            out.append(f"info {self.info!r}")
        return "handshake (" + "; ".join(out) + ")"


@dataclass
class Case:
    """One input: ``payload`` (after ``shake``, if any) on a fresh connection."""

    cls: str
    variant: str
    #: outcome labels a correct producer may answer with
    expect: frozenset
    payload: bytes = b""
    shake: Shake | None = None
    #: the client's Hello nonce (also seeds the MAC variants)
    nonce: bytes = b""


# -- frames ------------------------------------------------------------------------

def frame(msg) -> bytes:
    """A message frame without ``encode``'s size check (oversized inputs)."""
    body = msg if isinstance(msg, bytes | bytearray) else msgspec.msgpack.encode(msg)
    return P.HEADER.pack(P.MAGIC, P.KIND_MSG, len(body)) + bytes(body)


def as_dict(msg) -> dict:
    """A message as the dict msgpack carries (tag under ``type``, bytes kept)."""
    return msgspec.to_builtins(msg, builtin_types=(bytes,))


def hello(rng: random.Random, version: int | None = None) -> bytes:
    return P.encode(P.Hello(P.PROTOCOL_VERSION if version is None else version,
                            rng.randbytes(16), "kvbridge-fuzz"))


def _rid(rng: random.Random) -> str:
    return "fuzz-" + rng.randbytes(6).hex()


def message_types() -> list[type]:
    return list(typing.get_args(P.Message))


def sample_message(cls: type, rng: random.Random, target: Target):
    """An instance of any message class, fields filled by type (so message
    types added to the protocol later are covered too)."""
    def value(tp):
        if tp is int:
            return rng.choice([0, 1, rng.randrange(1 << 20)])
        if tp is bool:
            return rng.random() < 0.5
        if tp is str:
            return _rid(rng)
        if tp is bytes:
            return rng.randbytes(16)
        if tp is float:
            return rng.random()
        if tp is KVLayout:
            return target.layout
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list:
            return [value(args[0]) for _ in range(rng.randint(0, 3))] if args else []
        if tp is dict or origin is dict:
            return {}
        if args:  # a union: any non-None member
            return value(next(a for a in args if a is not type(None)))
        return None
    return cls(**{f.name: value(f.type) for f in msgspec.structs.fields(cls)})


def mutate(data: bytes, rng: random.Random, *, header_only: bool = False) -> bytes:
    """Flip bits or overwrite bytes (1-8 edits)."""
    b = bytearray(data)
    span = min(len(b), P.HEADER.size) if header_only else len(b)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(span)
        if rng.random() < 0.5:
            b[i] ^= 1 << rng.randrange(8)
        else:
            b[i] = rng.randrange(256)
    return bytes(b)


def nested(depth: int) -> bytes:
    """msgpack of ``depth`` nested one-element arrays around nil."""
    return b"\x91" * depth + b"\xc0"


def mismatched_layout(layout: KVLayout, rng: random.Random) -> tuple[KVLayout, list[str]]:
    """``layout`` with 1-3 fields changed to other *valid* values."""
    names = list(layout.__struct_fields__)
    for _ in range(100):
        changes = {}
        for name in rng.sample(names, rng.randint(1, 3)):
            old = getattr(layout, name)
            if name == "memory_layout":
                changes[name] = rng.choice([m for m in MEMORY_LAYOUTS if m != old])
            elif name == "tp_rank":
                changes.update(tp_size=layout.tp_size + 1, tp_rank=layout.tp_size)
            elif isinstance(old, int):
                changes[name] = old + rng.randint(1, 64)
            elif isinstance(old, str):
                changes[name] = old + "-" + rng.randbytes(2).hex()
        try:  # round-trip: the producer must be able to decode it
            new = msgspec.convert(msgspec.to_builtins({**layout.to_dict(), **changes}), KVLayout)
        except (msgspec.ValidationError, ValueError):
            continue
        if new != layout:
            return new, sorted(changes)
    raise RuntimeError("could not build a mismatched layout")


# -- the input classes ----------------------------------------------------------------

def make_case(seed: int, index: int, target: Target) -> Case:
    """Input ``index`` of the run seeded ``seed``: reproducible on its own."""
    rng = random.Random(f"kvbridge-fuzz:{seed}:{index}")
    cls = CLASSES[index % len(CLASSES)]
    case = _BUILDERS[cls](rng, target)
    case.cls = cls
    case.nonce = rng.randbytes(16)
    return case


def _random(rng: random.Random, target: Target) -> Case:
    variant = rng.choice(["bytes", "magic_prefix", "random_body", "random_msgpack"])
    n = int(2 ** rng.uniform(0, 10))
    if variant == "bytes":
        return Case("", variant, PRE_AUTH_REFUSALS, rng.randbytes(n))
    if variant == "magic_prefix":
        return Case("", variant, PRE_AUTH_REFUSALS, P.MAGIC + rng.randbytes(n))
    if variant == "random_body":  # a whole frame: read in full, then undecodable
        return Case("", variant, frozenset({"error:protocol"}), frame(rng.randbytes(n)))
    obj = rng.choice([{"type": _rid(rng)}, [rng.random()], {"type": 7}, _rid(rng), None, {}])
    return Case("", variant, frozenset({"error:protocol"}), frame(obj))


def _mutated(rng: random.Random, target: Target) -> Case:
    variant = rng.choice(["bitflip", "header", "two_frames", "type_confusion", "extra_field",
                          "deep_nesting"])
    h = hello(rng)
    if variant in ("bitflip", "header"):
        return Case("", variant, PRE_AUTH_REFUSALS, mutate(h, rng, header_only=variant == "header"))
    if variant == "two_frames":  # Hello + a Handshake with a made-up MAC
        hs = P.encode(P.Handshake(target.layout, rng.randbytes(32), target.backend, target.info))
        return Case("", variant, PRE_AUTH_REFUSALS, mutate(h + hs, rng))
    base = as_dict(P.Hello(P.PROTOCOL_VERSION, rng.randbytes(16), "kvbridge-fuzz"))
    if variant == "type_confusion":
        key = rng.choice(["protocol_version", "nonce", "agent"])
        base[key] = rng.choice([[1], {"a": 1}, 1.5, True, None] + [
            "x" if key != "agent" else 7])
        return Case("", variant, frozenset({"error:protocol"}), frame(base))
    if variant == "extra_field":  # unknown fields are ignored: a valid Hello
        base[_rid(rng)] = rng.choice([1, "x", [1, 2], {"k": b"v"}])
        return Case("", variant, frozenset({"closed"}), frame(base))
    # An unknown field holding deeply nested arrays: must be refused like any
    # undecodable body, not kill the connection's thread.
    body = msgspec.msgpack.encode({**base, "zz": None})[:-1] + nested(rng.randint(5000, 200000))
    return Case("", variant, frozenset({"error:protocol"}), frame(body))


def _truncated(rng: random.Random, target: Target) -> Case:
    variant = rng.choice(["header_cut", "body_cut", "second_header_cut", "second_body_cut"])
    h = hello(rng)
    hs = P.encode(P.Handshake(target.layout, rng.randbytes(32), target.backend, target.info))
    if variant == "header_cut":
        data = h[:rng.randrange(P.HEADER.size)]
    elif variant == "body_cut":
        data = h[:rng.randrange(P.HEADER.size, len(h))]
    elif variant == "second_header_cut":
        data = h + hs[:rng.randrange(1, P.HEADER.size)]
    else:
        data = h + hs[:rng.randrange(P.HEADER.size, len(hs))]
    return Case("", variant, frozenset({"closed"}), data)


def _oversized(rng: random.Random, target: Target) -> Case:
    variant = rng.choice(["msg_length", "data_first", "hello_then_oversized", "hello_then_data",
                          "unknown_kind", "max_cut", "max_legal", "max_plus_one"])
    err = frozenset({"error:protocol"})
    big = rng.randint(P.MAX_MESSAGE_BYTES + 1, (1 << 32) - 1)
    if variant == "msg_length":
        return Case("", variant, err, P.HEADER.pack(P.MAGIC, P.KIND_MSG, big))
    if variant == "data_first":
        return Case("", variant, err, P.data_header(rng.choice([0, 16, big])))
    if variant == "hello_then_oversized":
        return Case("", variant, err, hello(rng) + P.HEADER.pack(P.MAGIC, P.KIND_MSG, big))
    if variant == "hello_then_data":
        return Case("", variant, err, hello(rng) + P.data_header(rng.randrange(1 << 32)))
    if variant == "unknown_kind":
        kind = rng.choice([k for k in range(256) if k not in (P.KIND_MSG, P.KIND_DATA)])
        return Case("", variant, err, P.HEADER.pack(P.MAGIC, kind, rng.randrange(1 << 32)))
    # Before authentication a message may be at most MAX_HANDSHAKE_BYTES.
    limit = P.MAX_HANDSHAKE_BYTES
    if variant == "max_cut":  # a legal length whose body never comes
        return Case("", variant, frozenset({"closed"}),
                    P.HEADER.pack(P.MAGIC, P.KIND_MSG, limit) + rng.randbytes(64))
    # A Hello padded (agent string) to exactly the limit, or one byte over.
    over = variant == "max_plus_one"
    base = msgspec.msgpack.encode(P.Hello(P.PROTOCOL_VERSION, rng.randbytes(16), ""))
    # "agent": "" -> a str32 of n bytes adds 4 header bytes: solve for the body size.
    pad = limit + over - len(base) - 4
    body = msgspec.msgpack.encode(P.Hello(P.PROTOCOL_VERSION, rng.randbytes(16), "a" * pad))
    assert len(body) == limit + over, len(body)
    return Case("", variant, err if over else frozenset({"closed"}), frame(body))


def _version(rng: random.Random, target: Target) -> Case:
    v = P.PROTOCOL_VERSION
    variant = rng.choice(["older", "newer", "zero", "negative", "huge", "wrong_type"])
    if variant == "wrong_type":
        body = as_dict(P.Hello(v, rng.randbytes(16), "kvbridge-fuzz"))
        body["protocol_version"] = rng.choice([str(v), float(v), [v]])
        return Case("", variant, frozenset({"error:protocol"}), frame(body))
    bad = {"older": v - rng.randint(1, 3), "newer": v + rng.randint(1, 1000), "zero": 0,
           "negative": -rng.randint(1, 1 << 63), "huge": rng.randint(1 << 31, (1 << 64) - 1)}
    bad_v = bad[variant] if bad[variant] != v else v + 1
    return Case("", variant, frozenset({"error:version"}), hello(rng, bad_v))


def _auth(rng: random.Random, target: Target) -> Case:
    variant = rng.choice(["wrong_secret", "empty", "random", "truncated", "reflected", "stale",
                          "flipped", "extended", "hello_twice"])
    if variant == "hello_twice":
        return Case("", variant, frozenset({"error:protocol"}),
                    shake=Shake(wait_accept=False, replace=hello(rng)))
    return Case("", variant, frozenset({"error:auth"}), shake=Shake(mac=variant, wait_accept=False))


def _layout(rng: random.Random, target: Target) -> Case:
    variants = ["mismatch", "mismatch", "mismatch", "then_pull", "backend", "no_backend"]
    if target.backend == "cma":
        variants.append("foreign_host")  # cma refuses a consumer on another host
    variant = rng.choice(variants)
    if variant == "backend":
        other = rng.choice(["tcp", "cma", "nixl", "http", "\x00"])
        other = other if other != target.backend else "not-" + other
        return Case("", variant, frozenset({"error:backend"}),
                    shake=Shake(backend=other, wait_accept=False))
    if variant == "no_backend":
        return Case("", variant, frozenset({"error:backend"}),
                    shake=Shake(backend="", wait_accept=False))
    if variant == "foreign_host":
        return Case("", variant, frozenset({"error:backend"}),
                    shake=Shake(info={"boot_id": _rid(rng), "pidns": "pid:[1]"}, wait_accept=False))
    layout, fields = mismatched_layout(target.layout, rng)
    variant = f"{variant}:{'+'.join(fields)}"
    payload = P.encode(P.Pull(1, target.decoy, list(target.decoy_blocks))) \
        if variant.startswith("then_pull") else b""
    # The first Error is the label: a refused connection may then close (v1)
    # or wait for a Release and close on anything else (v2).
    return Case("", variant, frozenset({"error:layout"}), payload,
                Shake(layout=layout, wait_accept=False))


def _post_handshake(rng: random.Random, target: Target) -> Case:
    variant = rng.choice(["pull_unknown", "pull_bad_ids", "pull_unpublished_block", "pull_grant",
                          "pull_twice", "pull_empty", "read_done_never_granted",
                          "unexpected_type", "unknown_type", "wrong_field_type", "data_frame",
                          "oversized", "mutated", "truncated", "deep_nesting", "control"])
    x = rng.randrange(1, 1 << 62)
    decoy, blocks = target.decoy, list(target.decoy_blocks)
    err, shake = frozenset({"error:protocol"}), Shake()
    if variant == "pull_unknown":
        return Case("", variant, frozenset({"pull:not_published"}),
                    P.encode(P.Pull(x, _rid(rng), blocks)), shake)
    if variant == "pull_bad_ids":
        ids = rng.choice([[-1], [target.num_blocks], [(1 << 63) - 1], [-(1 << 63)],
                          [(1 << 64) - 1], blocks[:1] * 2])
        return Case("", variant, frozenset({"pull:blocks"}), P.encode(P.Pull(x, decoy, ids)), shake)
    if variant == "pull_unpublished_block":
        free = [b for b in range(target.num_blocks) if b not in blocks]
        return Case("", variant, frozenset({"pull:blocks"}),
                    P.encode(P.Pull(x, decoy, [rng.choice(free)])), shake)
    if variant == "pull_grant":  # the one valid request: granted, then never read
        tail = P.encode(P.ReadDone(x, decoy, False)) if rng.random() < 0.5 else b""
        return Case("", variant, frozenset({"grant"}), P.encode(P.Pull(x, decoy, blocks)) + tail,
                    shake)
    if variant == "pull_twice":  # a transfer id already in flight
        pull = P.encode(P.Pull(x, decoy, blocks))
        return Case("", variant, err, pull + pull, shake)
    if variant == "pull_empty":  # nothing to read: refusing or granting 0 bytes are both fine
        return Case("", variant, frozenset({"grant", "pull:blocks"}),
                    P.encode(P.Pull(x, decoy, [])), shake)
    if variant == "read_done_never_granted":
        return Case("", variant, err, P.encode(P.ReadDone(x, decoy, rng.random() < 0.5)), shake)
    if variant == "unexpected_type":
        types = [t for t in message_types() if t.__name__ not in ACCEPTED_AFTER_HANDSHAKE]
        cls = rng.choice(types)
        return Case("", f"{variant}:{cls.__name__}", err,
                    P.encode(sample_message(cls, rng, target)), shake)
    if variant == "unknown_type":
        return Case("", variant, err, frame({"type": "X" + _rid(rng), "xfer_id": x}), shake)
    if variant == "wrong_field_type":
        body = as_dict(P.Pull(x, decoy, blocks))
        wrong = {"xfer_id": [str(x), [x]], "request_id": [x, [decoy]],
                 "block_ids": [str(x), ["a"]]}
        key = rng.choice(list(wrong))
        body[key] = rng.choice(wrong[key] + [{"a": 1}, 1.5, None, b"\x00"])
        return Case("", variant, err, frame(body), shake)
    if variant == "data_frame":
        return Case("", variant, err, P.data_header(rng.choice([0, 64, (1 << 32) - 1])), shake)
    if variant == "oversized":
        big = rng.randint(P.MAX_MESSAGE_BYTES + 1, (1 << 32) - 1)
        return Case("", variant, err, P.HEADER.pack(P.MAGIC, P.KIND_MSG, big), shake)
    if variant == "mutated":
        frm = rng.choice([P.encode(P.Pull(x, decoy, blocks)), P.encode(P.ReadDone(x, decoy)),
                          P.encode(P.Pull(x, _rid(rng), blocks))])
        return Case("", variant, frozenset({"error:protocol", "pull:not_published", "pull:blocks",
                                            "pull:ended", "grant", "closed"}),
                    mutate(frm, rng), shake)
    if variant == "truncated":
        frm = P.encode(P.Pull(x, decoy, blocks))
        return Case("", variant, frozenset({"closed"}), frm[:rng.randrange(1, len(frm))], shake)
    if variant == "deep_nesting":
        body = msgspec.msgpack.encode({**as_dict(P.Pull(x, decoy, blocks)),
                                       "zz": None})[:-1] + nested(rng.randint(5000, 200000))
        return Case("", variant, err, frame(body), shake)
    # control: a control client (the scheduler) may only Publish; a bad Publish
    # is logged and ignored, then anything else closes the connection.
    unpublished = [b for b in range(target.num_blocks) if b not in blocks][:2]
    pub = rng.choice([P.Publish(_rid(rng), [target.num_blocks + 1]),
                      P.Publish(_rid(rng), blocks[:1] * 2),
                      P.Publish(_rid(rng), blocks, num_tokens=-1),
                      P.Publish(decoy, unpublished)])
    return Case("", variant, err, P.encode(pub) + P.encode(P.Pull(x, decoy, blocks)),
                Shake(backend="control"))


_BUILDERS = {"random": _random, "mutated": _mutated, "truncated": _truncated,
             "oversized": _oversized, "version": _version, "auth": _auth, "layout": _layout,
             "post_handshake": _post_handshake}
assert set(_BUILDERS) == set(CLASSES)

