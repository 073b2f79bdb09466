"""Build of record for credit-ops.

`pip install .` / `pip install -e .` work in any environment that has torch (>= 2.11), with or without build
isolation, and never download torch: torch is not a build requirement.

- When this script can import torch (`pip install --no-build-isolation ...`, `python setup.py build_ext --inplace`,
  `make build`), it compiles credit_ops._C against that torch and records what it was built for beside it
  (credit_ops/_C.<suffix>.build.json).
- When it cannot (pip's default isolated build), it installs the package without _C; `import credit_ops` then
  compiles _C against the torch that runs it, once, into a cache (credit_ops/build.py; `python -m credit_ops.build`
  does it ahead of time).

The C++ CPU kernels are always built. The CUDA sources in csrc/cuda/ are built whenever a CUDA toolkit and a
CUDA build of torch are present. The sources, flags and switches (CREDIT_OPS_SKIP_CUDA, CREDIT_OPS_FORCE_CUDA,
TORCH_CUDA_ARCH_LIST, MAX_JOBS, CREDIT_OPS_DEBUG) are defined once, in credit_ops/_build.py, for both builds.

    CREDIT_OPS_NO_EXT=1       package metadata only, no _C (the Makefile then builds _C in place, incrementally)
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_spec():
    # By file path: importing credit_ops would import torch, which the build environment may not have.
    path = os.path.join(ROOT, "credit_ops", "_build.py")
    spec = importlib.util.spec_from_file_location("_credit_ops_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_spec()


def extensions():
    """(ext_modules, cmdclass)."""
    if B.flag("CREDIT_OPS_NO_EXT"):
        # Package metadata only (the Makefile's editable install); `setup.py build_ext --inplace` builds _C next.
        return [], {}
    try:
        import torch
    except ImportError:
        print(
            "credit-ops: torch is not importable in this build environment (pip's isolated build): installing "
            "without the compiled extension. `import credit_ops` compiles it once against the installed torch "
            "(or run `python -m credit_ops.build`); `pip install --no-build-isolation` compiles it now.",
            file=sys.stderr,
        )
        return [], {}

    cuda, why = B.want_cuda(torch)
    os.environ.update(B.build_env(cuda))  # before cpp_extension reads CUDA_HOME
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    root = os.path.join(ROOT, "csrc")
    args = B.compile_args(torch, cuda)
    sources = [os.path.relpath(p, ROOT) for p in B.sources(root, cuda)]
    common = dict(include_dirs=[root, *args["include_dirs"]], extra_link_args=args["ldflags"])
    print(
        f"credit-ops: compiling credit_ops._C for torch {torch.__version__} "
        f"({'C++ and CUDA' if cuda else 'C++ CPU only'}: {why})",
        file=sys.stderr,
    )
    if cuda:
        ext = CUDAExtension(
            B.EXT_NAME, sources, extra_compile_args={"cxx": args["cxx"], "nvcc": args["nvcc"]}, **common
        )
    else:
        ext = CppExtension(B.EXT_NAME, sources, extra_compile_args={"cxx": args["cxx"]}, **common)
    key = B.build_key(torch, cuda, root)

    class BuildExt(BuildExtension):
        """BuildExtension that records, beside each built _C, the torch / Python / sources it was built for: the
        import (credit_ops/build.py) loads it only if they match, and compiles a matching one otherwise."""

        def run(self):
            super().run()
            # After run(), get_ext_fullpath is the in-place path for --inplace and editable builds (setuptools
            # copies the extension there), the build_lib one (packaged into the wheel) otherwise.
            for e in self.extensions:
                B.write_sidecar(self.get_ext_fullpath(e.name), key)

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = extensions()

setup(
    name="credit-ops",
    version="0.1.0",
    description="Fused kernels and a thin trainer for process-level credit assignment in GRPO-style RL",
    python_requires=">=3.11",
    # torch is found, not fetched: an environment with torch >= 2.11 installs nothing more of it. ninja is what the
    # first-import build (torch.utils.cpp_extension.load) runs.
    install_requires=["torch>=2.11", "ninja"],
    packages=[
        "credit_ops",
        "credit_ops.ops",
        "credit_ops.integrations",
        "credit_ops.triton_kernels",
        "credit_ops.trainer",
        "credit_ops._csrc",
    ],
    package_dir={
        "credit_ops": "credit_ops",
        "credit_ops.triton_kernels": "triton_kernels",
        "credit_ops.trainer": "trainer",
        # The C++/CUDA sources travel with the package, for the first-import build of an installed wheel.
        "credit_ops._csrc": "csrc",
    },
    # The trainer's shipped configs (`credit-train --config grpo`, from any directory) and its report template.
    package_data={
        "credit_ops._csrc": list(B.SOURCE_FILES),
        "credit_ops.trainer": ["configs/*.yaml", "templates/*.html.j2"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": ["credit-train=credit_ops.trainer.__main__:main"],
        # `import verl` loads its plugins: the credit-ops policy losses then exist in verl's registry by name.
        "verl.plugins": ["credit_ops = credit_ops.integrations.verl_plugin"],
    },
)
