# SPDX-License-Identifier: Apache-2.0
"""Build hook for kvbridge's native copy kernels.

The kernels are plain shared libraries loaded with ctypes (see
kvbridge/cache/kernels.py), not torch extensions: the CPU build of torch refuses CUDA
``cpp_extension`` builds, and a plain library works with any torch.

* ``csrc/cpu/*.cpp``  -> ``kvbridge/_lib/libkvbridge_cpu.so`` with the system C++
  compiler (``CXX``, default ``c++``).
* ``csrc/cuda/*.cu``  -> ``kvbridge/_lib/libkvbridge_cuda.so`` with ``nvcc`` when it
  is found (``NVCC`` or ``$CUDA_HOME/bin/nvcc`` or PATH).

A missing compiler or a failed build never fails the install: kvbridge falls
back to torch ops and says so in ``kvbridge info``. Set
``KVBRIDGE_REQUIRE_KERNELS=1`` (CI does) to make a failed build an error.

A wheel carries the libraries built (``kvbridge/_lib/``) and is tagged
``py3-none-<platform>``: the libraries are machine code for that platform but
no CPython extension, so one wheel serves every Python version.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:  # setuptools >= 70.1 ships bdist_wheel; before that it lives in `wheel`
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
CUDA_ARCHS = os.environ.get("KVBRIDGE_CUDA_ARCHS", "80;90;100;120")


def _log(msg: str) -> None:
    print(f"kvbridge build: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def build_cpu(out_dir: Path) -> bool:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        _log("no C++ compiler found; skipping the CPU kernel (torch fallback in use)")
        return False
    srcs = sorted(str(p) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    out = out_dir / "libkvbridge_cpu.so"
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", *srcs, "-o", str(out)]
    _log(" ".join(cmd))
    return subprocess.run(cmd).returncode == 0


def build_cuda(out_dir: Path) -> bool:
    nvcc = find_nvcc()
    srcs = sorted(str(p) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if not srcs:
        return False
    if not nvcc:
        _log("nvcc not found; skipping the CUDA kernel")
        return False
    gencode = []
    archs = [a for a in CUDA_ARCHS.split(";") if a]
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    out = out_dir / "libkvbridge_cuda.so"
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *gencode, *srcs,
           "-o", str(out)]
    _log(" ".join(cmd))
    return subprocess.run(cmd).returncode == 0


class BuildKernels(build_ext):
    """Builds the ctypes libraries in place of a Python extension."""

    def run(self) -> None:
        # Editable installs load from the source tree; wheels from build_lib.
        targets = [ROOT / "kvbridge" / "_lib"]
        if not self.inplace:
            targets.append(Path(self.build_lib) / "kvbridge" / "_lib")
        out_dir = targets[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        required = os.environ.get("KVBRIDGE_REQUIRE_KERNELS") == "1"
        for name, builder in (("CPU", build_cpu), ("CUDA", build_cuda)):
            try:
                ok = builder(out_dir)
            except OSError as e:
                ok = False
                _log(f"{name} kernel build error: {e}")
            if not ok:
                has_src = any((ROOT / "csrc" / name.lower()).glob("*.c*"))
                if required and has_src and (name == "CPU" or find_nvcc()):
                    raise SystemExit(f"kvbridge build: the {name} kernel failed to build "
                                     "and KVBRIDGE_REQUIRE_KERNELS=1")
                _log(f"{name} kernel not built")
        for extra in targets[1:]:
            extra.mkdir(parents=True, exist_ok=True)
            for lib in out_dir.glob("*.so"):
                shutil.copy2(lib, extra / lib.name)

    def get_outputs(self):
        return []


class PlatformWheel(bdist_wheel):
    """The placeholder extension makes the wheel platform-specific, as its
    libraries are; but they are loaded with ctypes and use no Python ABI, so
    the wheel is not tied to one Python version (``py3-none-<platform>``)."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    ext_modules=[Extension("kvbridge._lib._placeholder", sources=[])],
    cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel},
)
