# SPDX-License-Identifier: Apache-2.0
import os
import sys
from pathlib import Path

import pytest

# vLLM on this CPU machine; never reach a model hub; UCX on loopback only.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama, built once into the cache (keyed by the recipe's hash)."""
    from kvbridge.demo import tiny_model

    return tiny_model.ensure(tiny_model.default_path())


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
