"""Which implementation an op runs: the compiled kernels, the Triton kernels, or the pure-PyTorch reference.

    auto       CPU tensors -> C++ kernels; CUDA tensors -> the op's GPU kernels
    native     the compiled kernels: C++ on CPU, the op's GPU kernels on CUDA
    triton     the Triton kernels, also for CPU tensors when TRITON_INTERPRET=1 (how the tests run them)
    reference  credit_ops.reference: slow, obviously right, for debugging and as the test oracle

The one rule (``resolve``): an op's GPU kernels are either Triton kernels (token_logprobs, policy_loss, the fused
LM head) or CUDA kernels (align_edits, the advantage ops; the step ops are plain tensor code). An op with Triton
kernels runs them on CUDA under "auto" and "native" too, and under "triton" on CPU tensors when the interpreter is
on (an error otherwise). An op without Triton kernels runs its compiled kernels under every backend but
"reference": "triton" is a preference for Triton kernels where an op has them, not a demand.

Select with the CREDIT_OPS_BACKEND environment variable (read once, when credit_ops is imported: the backend is
looked up on every op call, ~3 us a time for an environment read) or ``with credit_ops.use_backend("reference"):``.
"""

import contextlib
import importlib.util
import os
import threading

BACKENDS = ("auto", "native", "triton", "reference")


class _State(threading.local):
    backend: str | None = None  # a class default: a missing thread-local attribute costs ~1 us to look up


_state = _State()


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown credit_ops backend {name!r}; expected one of {BACKENDS}")
    return name


_ENV_BACKEND = _validate(os.environ.get("CREDIT_OPS_BACKEND", "auto"))


def get_backend() -> str:
    """The backend selected for this thread."""
    return _state.backend or _ENV_BACKEND


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (see the module docstring)."""
    previous = _state.backend
    _state.backend = _validate(name)
    try:
        yield
    finally:
        _state.backend = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(device, *, triton: bool) -> str:
    """ "reference", "triton" or "native" for an op on tensors on ``device``; ``triton``: whether the op has Triton
    kernels (they are then its GPU kernels). See the module docstring."""
    backend = get_backend()
    if backend == "reference":
        return "reference"
    if not triton:
        return "native"
    if backend == "triton" or device.type == "cuda":
        if not has_triton():
            raise RuntimeError("this op's GPU kernels are Triton kernels, and triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return "triton"
    return "native"
