"""Which implementation an op runs: the compiled kernels, the Triton kernels, or the pure-PyTorch reference.

    auto       CPU tensors -> C++ kernels; CUDA tensors -> the op's GPU kernel (Triton or CUDA)
    native     the compiled kernels: C++ on CPU, the op's GPU kernel (CUDA or Triton) on CUDA
    triton     the Triton kernels, also for CPU tensors when TRITON_INTERPRET=1 (how the tests run them)
    reference  credit_ops.reference: slow, obviously right, for debugging and as the test oracle

Select with the CREDIT_OPS_BACKEND environment variable or ``with credit_ops.use_backend("reference"):``.
"""

import contextlib
import os
import threading

BACKENDS = ("auto", "native", "triton", "reference")

_state = threading.local()


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown credit_ops backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend selected for this thread."""
    return getattr(_state, "backend", None) or _validate(os.environ.get("CREDIT_OPS_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (see the module docstring)."""
    previous = getattr(_state, "backend", None)
    _state.backend = _validate(name)
    try:
        yield
    finally:
        _state.backend = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick(device, gpu: str = "triton") -> str:
    """Resolve the backend for tensors on ``device``; ``gpu`` names the op's GPU implementation."""
    backend = get_backend()
    if backend == "reference":
        return "reference"
    # An op has one GPU implementation: for a Triton op, "native" on CUDA means its Triton kernel.
    if backend == "triton" or (device.type == "cuda" and gpu == "triton"):
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return "triton"
    return "native"
