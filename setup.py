"""Build of record for credit_ops._C.

The C++ CPU kernels are always built. The CUDA sources in csrc/cuda/ are built whenever a CUDA toolkit and a
CUDA build of torch are present. Environment switches (flash-attention style):

    CREDIT_OPS_FORCE_CUDA=1   build the CUDA sources even if the check below says no (fails loudly if impossible)
    CREDIT_OPS_SKIP_CUDA=1    never build the CUDA sources (a CPU-only _C, quick to rebuild while developing)
    TORCH_CUDA_ARCH_LIST      GPU targets, default "8.0;9.0a" (Ampere and Hopper)
    MAX_JOBS                  parallel compile jobs, default sized from cores and RAM
    CREDIT_OPS_DEBUG=1        -O0 -g
    CREDIT_OPS_NO_EXT=1       package metadata only, no _C (the Makefile then builds _C in place, incrementally)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("CREDIT_OPS_SKIP_CUDA"):
        return False
    if _flag("CREDIT_OPS_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _default_max_jobs():
    # nvcc takes ~2-3 GB per job on the heavier files: size by RAM as well as cores.
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(ram_gb // 3))))


def extensions():
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses CUDA_HOME from the first nvcc on PATH, which can be a wrapper script.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = _flag("CREDIT_OPS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-fopenmp", "-Wno-psabi"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/core/*.cpp"))
    common = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        import torch

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        # Headers the system toolkit may lack (cusparse.h, ...) ship with torch's pip CUDA packages.
        extra_inc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
        nvcc = [*opt, "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "credit_ops._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **{**common, "include_dirs": common["include_dirs"] + [os.path.abspath(p) for p in extra_inc]},
        )
    else:
        ext = CppExtension("credit_ops._C", sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], BuildExtension


if _flag("CREDIT_OPS_NO_EXT"):
    # Package metadata only (the Makefile's editable install); `setup.py build_ext --inplace` builds _C next.
    ext_modules, build_ext = [], None
else:
    ext_modules, build_ext = extensions()

setup(
    name="credit-ops",
    version="0.1.0",
    description="Fused kernels and a thin trainer for process-level credit assignment in GRPO-style RL",
    python_requires=">=3.11",
    packages=["credit_ops", "credit_ops.ops", "credit_ops.triton_kernels", "credit_ops.trainer"],
    package_dir={
        "credit_ops": "credit_ops",
        "credit_ops.triton_kernels": "triton_kernels",
        "credit_ops.trainer": "trainer",
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext} if build_ext else {},
    entry_points={"console_scripts": ["credit-train=credit_ops.trainer.__main__:main"]},
)
