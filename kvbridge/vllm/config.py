# SPDX-License-Identifier: Apache-2.0
"""``kv_connector_extra_config`` of KVBridgeConnector, with its defaults.

Example::

    --kv-transfer-config '{"kv_connector": "KVBridgeConnector",
                           "kv_role": "kv_producer",
                           "kv_port": 14579,
                           "kv_connector_extra_config": {"transport": "auto"}}'

=====================  ==============================================  ===========
key                    meaning                                         default
=====================  ==============================================  ===========
``transport``          ``auto``: per producer, ``cma`` on this host,    ``auto``
                       ``tcp`` across hosts (``nixl`` where RDMA is
                       present); or ``tcp``, ``cma``, ``nixl``
``host``               address the producer's listener binds           127.0.0.1
``advertise_host``     address consumers are told to dial              ``host``
``port``               producer base port; rank r listens on port+r    ``kv_port``
``lease_s``            producer holds unread blocks this long          120
``secret``             HMAC shared secret (else $KVBRIDGE_SECRET)      none
``transfer_timeout_s`` a pull with no progress this long fails         30
``handshake_timeout_s`` connect + layout handshake deadline (a dead   20
                       producer or a refusal fails at once)
``publish_wait_s``     consumer waits this long for a late publish     10
``host_staging``       stage blocks through a host mirror of the KV    ``auto``
                       cache: ``auto`` (when the cache is not in host
                       memory, i.e. on a GPU), ``true``, ``false``
``checksum``           end-to-end KV checksums: the producer digests   ``true``
                       each block it publishes, the consumer checks
                       what it landed; a mismatch is a load error
                       (``kv_load_failure_policy`` applies)
``fault_flip_byte_``   fault injection: the consumer flips one byte    0 (off)
``every``              of every Nth pull it lands (tests, chaos runs)
``step_yield_ms``      while transfers are in flight, the engine's     2
                       thread sleeps this long at each step's
                       connector hooks, so kvbridge's threads get the
                       GIL (see below); 0 turns it off
``idle_wait_ms``       a step that computes no token while transfers   20
                       are in flight waits up to this long for one to
                       finish (returning the moment one does) instead
                       of spinning through empty steps (see below);
                       0 turns it off
``stream_chunk_blocks`` consumer, streamed requests (``kvbridge       4
                       proxy --kv-mode stream``): blocks per pull; each
                       is granted once prefill computed its blocks
=====================  ==============================================  ===========

Why ``step_yield_ms``: vLLM's multiprocess workers wait for the next step in
a loop of ``os.sched_yield()`` calls (``shm_broadcast``), which releases and
retakes the GIL millions of times a second. CPython's GIL hands over to a
waiting thread only when the holder keeps it for a whole switch interval, so
every other thread in the worker - kvbridge's handshakes, grants and
receives - can wait for seconds, sometimes over a minute (measured here with
a TP=2 decode engine: a handshake stalled past its 20 s deadline, a grant
arrived after 101 s, while the process's own watchdog thread saw no GIL at
all). A short real sleep in the hooks the engine's thread calls every step
hands the GIL over.

Why ``idle_wait_ms``: vLLM keeps stepping an engine while any request waits
on the connector - a producer's finished requests until consumers read them,
a consumer's requests until their KV lands - even when no token is left to
compute. Each empty step is a round trip between the engine core and every
worker, and between steps they wait for each other by spinning on
``sched_yield``. On a machine with fewer cores than busy processes that spin
starves the very processes the wait is for (measured here, two TP=2 engines
on 2 cores beside two busy processes: the decode's answer took 2-34 s, the
machine's other processes got no CPU for up to 73 s; with the wait, beside
four busy processes, 0.15-0.98 s). Waiting on the
transport's progress event instead costs no latency: the step returns the
moment a pull lands or a lease is let go; only a new request arriving at an
engine that computes nothing waits up to this long to be scheduled.

Host staging: sockets and cross-memory attach address host memory only, so a
KV cache in GPU memory is mirrored in page-locked host memory (as
NixlConnector's ``kv_buffer_device: "cpu"`` does): the producer copies a
request's blocks device -> mirror when it publishes them, the consumer copies
pulled blocks mirror -> device before reporting them received. The copies are
kvbridge's CUDA kernel (one launch for all layers and blocks), or the copy op
vLLM hands over through ``set_host_xfer_buffer_ops`` when that kernel is not
built. ``true`` forces the mirror for a host cache too (it exercises the same
path on a CPU-only machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbridge.cache.hugepages import MODES as HUGE_PAGE_MODES
from kvbridge.transport import DEFAULT as DEFAULT_TRANSPORT
from kvbridge.transport import TransportConfig, transport_class

_KNOWN = {"transport", "host", "advertise_host", "port", "lease_s", "secret",
          "transfer_timeout_s", "handshake_timeout_s", "publish_wait_s", "host_staging",
          "checksum", "fault_flip_byte_every", "step_yield_ms",
          "idle_wait_ms", "stream_chunk_blocks", "huge_pages"}


def _flag(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes", "on"):
        return True
    if str(value).lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"kv_connector_extra_config.{key} must be true or false, got {value!r}")


@dataclass
class KVBridgeConfig:
    role: str
    transport: str
    base_port: int
    transport_config: TransportConfig
    #: "auto", "true" or "false" (see the module docstring)
    host_staging: str = "auto"
    #: seconds the engine thread sleeps per step while transfers are in flight
    step_yield_s: float = 0.002
    #: longest wait of a step that computes nothing while transfers are in flight
    idle_wait_s: float = 0.020
    #: consumer: blocks per pull of a streamed request
    stream_chunk_blocks: int = 4

    @property
    def is_producer(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")

    @classmethod
    def from_vllm(cls, vllm_config) -> KVBridgeConfig:
        ktc = vllm_config.kv_transfer_config
        if ktc is None:
            raise ValueError("KVBridgeConnector needs --kv-transfer-config")
        extra = dict(ktc.kv_connector_extra_config or {})
        unknown = sorted(set(extra) - _KNOWN)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys for KVBridgeConnector: "
                             f"{unknown}; known: {sorted(_KNOWN)}")
        role = ktc.kv_role or "kv_both"
        if role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {role!r}")
        transport = str(extra.get("transport", DEFAULT_TRANSPORT))
        transport_class(transport)  # unknown names fail here, at start-up
        tc = TransportConfig(
            host=str(extra.get("host", "127.0.0.1")),
            advertise_host=extra.get("advertise_host"),
            secret=extra.get("secret"),
            lease_s=float(extra.get("lease_s", 120.0)),
            transfer_timeout_s=float(extra.get("transfer_timeout_s", 30.0)),
            handshake_timeout_s=float(extra.get("handshake_timeout_s",
                                                TransportConfig().handshake_timeout_s)),
            publish_wait_s=float(extra.get("publish_wait_s", 10.0)),
            checksum=_flag(extra.get("checksum", True), "checksum"),
            fault_flip_byte_every=int(extra.get("fault_flip_byte_every", 0)),
            huge_pages=_choice(extra, "huge_pages", HUGE_PAGE_MODES, "collapse"),
        )
        staging = str(extra.get("host_staging", "auto")).lower()
        if staging not in ("auto", "true", "false"):
            raise ValueError(f"kv_connector_extra_config.host_staging must be auto, true or "
                             f"false, got {extra.get('host_staging')!r}")
        step_yield_ms = _milliseconds(extra, "step_yield_ms", 2.0)
        idle_wait_ms = _milliseconds(extra, "idle_wait_ms", 20.0)
        chunk = extra.get("stream_chunk_blocks", 4)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"kv_connector_extra_config.stream_chunk_blocks must be a positive "
                             f"integer, got {chunk!r}")
        return cls(role=role, transport=transport, base_port=int(extra.get("port", ktc.kv_port)),
                   transport_config=tc, host_staging=staging, step_yield_s=step_yield_ms / 1e3,
                   idle_wait_s=idle_wait_ms / 1e3, stream_chunk_blocks=chunk)


def _choice(extra: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = str(extra.get(key, default)).lower()
    if value not in choices:
        raise ValueError(f"kv_connector_extra_config.{key} must be one of {', '.join(choices)}, "
                         f"got {extra.get(key)!r}")
    return value


def _milliseconds(extra: dict, key: str, default: float) -> float:
    """A per-step wait in [0, 100] ms: longer would stall the engine's steps."""
    try:
        value = float(extra.get(key, default))
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value <= 100:
        raise ValueError(f"kv_connector_extra_config.{key} must be a number of milliseconds "
                         f"in [0, 100], got {extra.get(key)!r}")
    return value
