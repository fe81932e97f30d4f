# SPDX-License-Identifier: Apache-2.0
"""Which vLLM the connector loads in: the API check against a release's
source (``scripts/check_vllm_api.py``) and the check at import
(``kvbridge.vllm.compat``)."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from kvbridge.vllm import compat

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_vllm_api.py"
BASE = Path("vllm/distributed/kv_transfer/kv_connector/v1/base.py")


def installed_vllm_source() -> Path:
    """The folder holding the installed vllm package, found without importing it."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM is not installed in this environment"
    return Path(spec.origin).parents[1]


def run_check(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(src)], capture_output=True,
                          text=True, timeout=60)


def test_connector_matches_the_installed_vllm_api():
    out = run_check(installed_vllm_source())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "result: compatible" in out.stdout


def test_api_check_fails_on_a_new_abstract_hook_and_a_changed_signature(tmp_path):
    """A release that adds an abstract hook and renames a parameter of one
    KVBridgeConnector overrides is reported incompatible, naming both."""
    text = (installed_vllm_source() / BASE).read_text()
    assert "    def get_finished(\n        self, finished_req_ids: set[str]" in text
    text = text.replace("    def get_finished(\n        self, finished_req_ids: set[str]",
                        "    def get_finished(\n        self, finished_request_ids: set[str]")
    text = text.replace("    @abstractmethod\n    def wait_for_layer_load(",
                        "    @abstractmethod\n    def flush_all_layers(self) -> None:\n"
                        "        ...\n\n    @abstractmethod\n    def wait_for_layer_load(", 1)
    (tmp_path / BASE).parent.mkdir(parents=True)
    (tmp_path / BASE).write_text(text)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    out = run_check(tmp_path)
    assert out.returncode == 1, out.stdout
    assert "abstract flush_all_layers() is not implemented" in out.stdout
    assert ("get_finished: parameters ['finished_req_ids'] differ from vLLM's "
            "['finished_request_ids']") in out.stdout


class _Base:
    def __init__(self, vllm_config, role, kv_cache_config):
        pass


for _name in compat.REQUIRED_HOOKS:
    setattr(_Base, _name, lambda self: None)


def test_a_vllm_without_a_required_hook_is_refused_naming_the_range():
    no_load_errors = type("NoLoadErrors", (), {k: v for k, v in vars(_Base).items()
                                               if k != "get_block_ids_with_load_errors"})
    with pytest.raises(compat.UnsupportedVLLMError) as e:
        compat.check_vllm(no_load_errors, "0.9.2")
    assert compat.SUPPORTED_VLLM in str(e.value)
    assert "get_block_ids_with_load_errors" in str(e.value) and "0.9.2" in str(e.value)


def test_a_constructor_without_the_kv_cache_config_is_refused():
    old_init = type("OldInit", (_Base,), {"__init__": lambda self, vllm_config, role: None})
    with pytest.raises(compat.UnsupportedVLLMError, match="kv_cache_config"):
        compat.check_vllm(old_init, "0.32.0")


def test_optional_hooks_are_detected_by_presence_not_version(caplog):
    with_sleep = type("WithSleep", (_Base,), {"unregister_kv_caches": lambda s: None,
                                              "restore_kv_caches": lambda s: None})
    # A version string that claims nothing about the API: the hooks decide.
    assert "unregister_kv_caches" not in compat.check_vllm(with_sleep, "dev")
    assert "unregister_kv_caches" in compat.check_vllm(_Base, "0.33.0")


@pytest.mark.parametrize("version,supported", [
    ("0.29.9", False), ("0.30.0", True), ("0.32.0+cpu", True), ("0.33.1.dev12+gabc", True),
    ("0.34.0", False), ("dev", False),
])
def test_versions_outside_the_range_warn(caplog, version, supported):
    assert compat.version_supported(version) == supported
    with caplog.at_level(logging.WARNING, logger="kvbridge"):
        compat.check_vllm(_Base, version)
    warned = any("outside the supported range" in r.getMessage() for r in caplog.records)
    assert warned == (not supported)
