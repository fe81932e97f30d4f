# SPDX-License-Identifier: Apache-2.0
"""A producer transport in its own process, driven over a multiprocessing pipe.

Commands (tuples) and replies:
  ("publish", request_id, block_ids, lease_s)  -> None | error string
  ("progress", request_id, block_ids, complete) -> bool (publish_progress)
  ("release", request_id)                      -> bool (was it held)
  ("poll",)                                    -> [(request_id, reason), ...]
  ("metrics",)                                 -> dict
  ("digest", block_ids)                        -> hex digest of those blocks
  ("stop",)                                    -> None, then exit
"""

from __future__ import annotations

import hashlib
import os


def make_cache(num_blocks: int, seed: int | None, *, block_size: int = 32, kv_heads: int = 2,
               head_size: int = 16, layers: int = 2, dtype: str = "bfloat16",
               model: str = "test-model", tp_size: int = 1, tp_rank: int = 0,
               memory_layout: str = "LBHNC", regions_per_layer: int = 1):
    """A paged cache of random bytes (``seed``) or zeros (``seed`` None): the
    one way tests build a ``PagedKVCache`` and its ``KVLayout``.

    ``dtype`` is a torch dtype or its name; ``regions_per_layer`` > 1 gives
    each layer that many tensors (K and V apart).

    With ``tp_size`` > 1 it is rank ``tp_rank``'s shard of the cache the same
    seed gives at TP 1: its heads (``kvbridge.cache.shard.rank_heads``) of every
    block, so shards of two TP sizes can be compared byte for byte.
    """
    from kvbridge.cache.synthetic import synthetic_cache

    return synthetic_cache(num_blocks, kv_heads=kv_heads, block_size=block_size,
                           head_size=head_size, layers=layers, dtype=dtype, model=model,
                           memory_layout=memory_layout, tp_size=tp_size, tp_rank=tp_rank,
                           regions_per_layer=regions_per_layer, seed=seed)


def digest(cache, block_ids) -> str:
    h = hashlib.sha256()
    for v in cache.byte_views:
        for b in block_ids:
            h.update(v[b].numpy().tobytes())
    return h.hexdigest()


#: env key: the network namespace a helper process enters before any socket
NETNS_ENV = "KVBRIDGE_TEST_NETNS"


def _enter_netns(env: dict) -> None:
    if env.get(NETNS_ENV):
        from kvbridge.bench.netns import enter

        enter(env[NETNS_ENV])


def _peer(backend: str, cache_kw: dict, config_kw: dict, env: dict):
    """This helper process's cache and transport, in its namespace and env."""
    os.environ.update(env)
    _enter_netns(env)
    from kvbridge.transport import TransportConfig, create_transport

    cache = make_cache(**cache_kw)
    return cache, create_transport(backend, cache, TransportConfig(**config_kw))


def _serve(pipe, cache, transport, commands: dict) -> None:
    """Answer ``(cmd, *args)`` from ``pipe`` with ``commands[cmd](*args)``
    until ``stop``; every peer also answers ``digest`` of its blocks and
    ``flip`` (one byte of a block corrupted in place)."""
    from kvbridge.cache import checksum

    commands = {"digest": lambda ids: digest(cache, ids),
                "flip": lambda block, offset: checksum.flip_byte(cache, block, offset),
                **commands}
    while True:
        cmd, *args = pipe.recv()
        if cmd == "stop":
            transport.close()
            pipe.send(None)
            return
        pipe.send(commands[cmd](*args))


def producer_main(pipe, backend: str, cache_kw: dict, config_kw: dict, env: dict) -> None:
    cache, transport = _peer(backend, cache_kw, config_kw, env)
    pipe.send(transport.serve())

    def publish(rid, ids, lease_s):
        try:
            transport.publish(rid, ids, lease_s=lease_s)
        except Exception as e:  # noqa: BLE001 - the test asserts on the message
            return str(e)

    def progress(rid, ids, complete):
        return transport.publish_progress(rid, ids, complete=complete)

    _serve(pipe, cache, transport, {
        "publish": publish, "progress": progress, "release": transport.release, "poll": transport.poll_released,
        "metrics": transport.metrics, "held": transport.leases.held})


def consumer_main(pipe, backend: str, cache_kw: dict, config_kw: dict, env: dict) -> None:
    """A consumer in its own process (and namespace): pulls started by one
    command and waited for by another, so a test can act in between."""
    import time

    cache, transport = _peer(backend, cache_kw, config_kw, env)
    handles = {}
    pipe.send(None)

    def pull(peer, rid, remote, local):
        handles[rid] = (transport.pull(peer, rid, remote, local), time.monotonic())

    def wait(rid, timeout):
        h, t0 = handles[rid]
        state = h.wait(timeout)
        return (state.value, str(h.error_code) if h.error_code else None, h.error,
                time.monotonic() - t0)

    _serve(pipe, cache, transport, {
        "pull": pull, "state": lambda rid: handles[rid][0].state.value, "wait": wait})
