import os

import torch

# Without a GPU the Triton kernels run in the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import credit_ops  # noqa: E402,F401
from credit_ops._backend import triton_interpreting  # noqa: E402


def backend_devices():
    """(backend, device) pairs every op is tested on: the C++ kernels and the reference on CPU, the Triton
    kernels through the interpreter on CPU, and the GPU kernels when CUDA is available."""
    pairs = [("native", "cpu"), ("reference", "cpu")]
    if triton_interpreting():
        pairs.append(("triton", "cpu"))
    if torch.cuda.is_available():
        pairs += [("native", "cuda"), ("triton", "cuda")]
    return pairs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def large_outputs(fn, min_numel):
    """Run fn and return (op name, data_ptr) of every tensor of at least min_numel elements an aten / custom op
    produced meanwhile (views included: compare the pointers against the tensors the caller expects)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.numel() >= min_numel:
                    seen.append((str(func), o.data_ptr()))
            return out

    with Record():
        fn()
    return seen
