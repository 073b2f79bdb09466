"""token_logprobs: credit_ops vs eager PyTorch, torch.compile, TRL's per-row loop and (GPU) Liger-Kernel.

CPU: (4, 256, 32000) logits. GPU: the reference logits shape (benchmarks/results/README.md, "Shapes and targets"),
bf16 (8, 2049, 151936) sliced to [:, :-1]. Bytes counted = one read of the logits used (the floor); GB/s over the
measured copy bandwidth is the fraction of the hardware limit.
"""

import pytest
import torch

import credit_ops
from benchmarks.conftest import DEVICE, measure
from credit_ops import reference

if DEVICE == "cuda":
    B, T, V, DTYPES = 8, 2048, 151936, [torch.bfloat16]
else:
    B, T, V, DTYPES = 4, 256, 32000, [torch.float32, torch.bfloat16]


def trl_selective_log_softmax(logits, index):
    """TRL's selective_log_softmax (bf16/fp16 branch): a per-row loop to bound memory."""
    out = []
    for row_logits, row_labels in zip(logits, index, strict=True):
        row_logps = torch.log_softmax(row_logits.float(), dim=-1)
        out.append(row_logps.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def _liger():
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    except ImportError:
        return None
    return fused_selective_log_softmax


_compiled = {}


def _compiled_reference(entropy):
    if entropy not in _compiled:
        _compiled[entropy] = torch.compile(lambda x, y: reference.token_logprobs(x, y, return_entropy=entropy))
    return _compiled[entropy]


IMPLS = ["credit_ops", "eager", "torch_compile", "trl_per_row", "liger"]


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def inputs(request):
    torch.manual_seed(0)
    full = (torch.randn(B, T + 1, V, device=DEVICE) * 3).to(request.param)  # model output incl. the last position
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    return full, labels


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_token_logprobs(benchmark, inputs, copy_bandwidth, impl, entropy):
    full, labels = inputs
    logits = full[:, :-1]  # (B, T, V) view: what a trainer scores
    benchmark.group = f"token_logprobs {'+entropy' if entropy else ''} {tuple(logits.shape)} {full.dtype}"
    if impl == "credit_ops":
        fn = lambda: credit_ops.token_logprobs(logits, labels, return_entropy=entropy)
    elif impl == "eager":
        fn = lambda: reference.token_logprobs(logits, labels, return_entropy=entropy)
    elif impl == "torch_compile":
        fn = lambda: _compiled_reference(entropy)(logits, labels)
    elif impl == "trl_per_row":
        if entropy:
            pytest.skip("TRL's helper computes no entropy")
        fn = lambda: trl_selective_log_softmax(logits, labels)
    else:
        liger = _liger()
        if liger is None or DEVICE != "cuda" or entropy:
            pytest.skip("Liger-Kernel needs CUDA and has no entropy in its logprob kernel")
        fn = lambda: liger(full, labels, temperature=1.0)  # reads rows [:, :-1] of full
    measure(benchmark, fn, bytes_moved=logits.numel() * logits.element_size(), ceiling=copy_bandwidth, impl=impl)
