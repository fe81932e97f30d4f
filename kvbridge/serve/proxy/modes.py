# SPDX-License-Identifier: Apache-2.0
"""How the proxy hands a request's KV from prefill to decode (``--kv-mode``).

``pull`` (vLLM's proxy contract): decode gets the request once prefill
answered, with the ``kv_transfer_params`` of that answer. ``stream``: both get
it at once - a KVBridgeConnector prefill instance publishes under a stream id
the proxy makes up and decode reads it while prefill computes
(``kvbridge.vllm.stream``); a NixlPushConnector one is told nothing new and
decode registers its blocks with it for prefill to write into.
"""

from __future__ import annotations

from kvbridge.serve.proxy.backends import Backend

#: Fields vLLM's toy proxy sets on the prefill request (NixlConnector's
#: contract); KVBridgeConnector reads ``do_remote_decode``.
PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                     "remote_engine_id": None, "remote_block_ids": None, "remote_host": None,
                     "remote_port": None}


#: How decode gets the KV (``create_app``'s ``kv_mode``).
KV_MODES = ("pull", "stream")


def can_stream(prefill: Backend) -> bool:
    """A prefill instance whose KVBridgeConnector streams (one KV cache group)."""
    d = prefill.describe or {}
    return bool(d.get("stream") and d.get("addresses"))


def streamed_kv_params(describe: dict, stream_id: str) -> tuple[dict, dict]:
    """(prefill's, decode's) kv_transfer_params of one streamed request
    (``kvbridge.vllm.stream``): prefill publishes under ``stream_id`` as it
    computes; decode reads it by position from the addresses prefill serves on."""
    p_params = dict(PREFILL_KV_PARAMS, kvbridge_stream_id=stream_id)
    d_params = {"do_remote_prefill": True, "do_remote_decode": False, "kvbridge_stream": True,
                "remote_request_id": stream_id, "remote_engine_id": None,
                "remote_block_ids": None, "remote_addresses": list(describe["addresses"]),
                "remote_instance_ids": describe.get("instance_ids"),
                "layout_fingerprint": describe.get("layout_fingerprint"),
                "transport": describe.get("transport"), "kvbridge": describe.get("kvbridge")}
    return p_params, d_params


def push_coords(kv_params: dict) -> dict:
    """What decode needs to register with a NixlPushConnector prefill
    instance before it computed a request (its answers carry it)."""
    keys = ("remote_engine_id", "remote_host", "remote_port", "tp_size", "pp_size", "dcp_size",
            "transfer_mode")
    return {k: kv_params[k] for k in keys if k in kv_params}


def vllm_request_id(path: str, header_id: str) -> str:
    """The id vLLM's API server gives a request sent with ``X-Request-Id:
    header_id`` (less the random suffix its engine adds): NixlPushConnector's
    decode names the prefill's request by it."""
    return f"chatcmpl-{header_id}" if path.endswith("/chat/completions") \
        else f"cmpl-{header_id}-0"
