"""Build mtmerge and its compiled extension ``mtmerge._C``.

* The CPU extension (``csrc/**/*.cpp``) is always built: C++17, -O3, OpenMP.
  Hot loops are compiled for several ISAs at once with GCC/Clang ``target_clones``
  (see ``csrc/common/simd.h``), so one binary runs on any x86-64 and uses
  AVX2/AVX-512 where the CPU has them, chosen at load time (no SIGILL on old CPUs).
* ``csrc/cuda/*.cu`` join the build only when torch was built with CUDA and nvcc is
  found, or when ``MTMERGE_FORCE_CUDA=1``.
* ``MTMERGE_SKIP_BUILD=1`` skips all compiling: the ops then run on the PyTorch
  reference (one warning at import).
* Packages are found, not listed: every package under ``mtmerge/`` and ``kernels/`` (Triton,
  installed as ``mtmerge.kernels``, subpackages such as ``kernels/merge/`` included), so a new
  subpackage is never silently left out (``tests/test_packaging.py`` checks it).

Install torch first, then ``pip install --no-build-isolation .``: a build-isolated
install would pull a multi-GB CUDA build of torch.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def _extensions():
    if _env_flag("MTMERGE_SKIP_BUILD"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -ffp-contract=off: no FMA contraction, so every backend does the same float32 roundings;
    # -fno-trapping-math lets GCC vectorize float compares and selects (no effect on results)
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-fno-trapping-math", "-Wall",
                 "-Wno-unused-function", "-Wno-c++20-extensions"]
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = _env_flag("MTMERGE_FORCE_CUDA") or (
        torch.version.cuda is not None and shutil.which("nvcc") is not None
    )
    define_macros = [("MTMERGE_CXX_FLAGS", '"' + " ".join(cxx_flags) + '"')]
    extra = {
        "extra_compile_args": {"cxx": cxx_flags},
        "extra_link_args": ["-fopenmp"],
        "include_dirs": [os.path.join(ROOT, "csrc")],
    }
    if with_cuda and cuda_sources:
        define_macros.append(("MTMERGE_WITH_CUDA", "1"))
        extra["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension("mtmerge._C", sources + cuda_sources, define_macros=define_macros, **extra)
    else:
        ext = CppExtension("mtmerge._C", sources, define_macros=define_macros, **extra)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# kernels/ is installed as mtmerge.kernels, never as a top-level `kernels` (another package's name)
PACKAGE_DIR = {"mtmerge.kernels": "kernels"}


def find_all_packages() -> list[str]:
    """``mtmerge`` and all its subpackages, plus ``kernels`` and its subpackages as ``mtmerge.kernels.*``."""
    packages = find_packages(where=ROOT, include=["mtmerge", "mtmerge.*"])
    kernels = find_packages(where=os.path.join(ROOT, PACKAGE_DIR["mtmerge.kernels"]))
    packages += ["mtmerge.kernels", *(f"mtmerge.kernels.{name}" for name in kernels)]
    return sorted(set(packages))


PACKAGES = find_all_packages()
ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
