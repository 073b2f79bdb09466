"""policy_loss forward+backward over logits: credit_ops vs eager PyTorch, torch.compile and (GPU) Liger-Kernel's
triton_grpo_loss, side by side; time and peak extra memory.

CPU: (4, 256, 32000). GPU: the reference logits shape (benchmarks/results/README.md, "Shapes and targets"), bf16
(8, 2049, 151936) model output, N = 16384 scored tokens (~5 GB). credit_ops and Liger take the full (B, T + 1, V)
output (the last position dropped); credit_ops runs with per-token advantages and gates (Liger cannot take them: it
runs with per-sequence advantages); "credit_ops_seq_adv" is the like-for-like row, "credit_ops_aligned_view" passes
logits[:, :-1]; "credit_ops_two_pass" / "_cluster" force the long-row layout (the Hopper cluster kernel: GPU sm_90
only). Bytes counted = one read of the logits plus one write of the gradient (the 2-pass floor). Target: >= 1.5x
faster than Liger's per-sequence kernel. The active-fraction sweep (active-token compaction, f in {1, 0.5, 0.25,
0.1}): dense vs active_only side by side.
"""

import contextlib
import os

import pytest
import torch

import credit_ops
from benchmarks.bench_fused_linear import ACTIVE_IMPLS, cpu_peak_extra_gb, record_vs_dense
from benchmarks.conftest import DEVICE, measure
from credit_ops import reference
from credit_ops.ops.policy_loss import cluster_ok

if DEVICE == "cuda":
    B, T, V, DTYPES = 8, 2048, 151936, [torch.bfloat16]
else:
    B, T, V, DTYPES = 4, 256, 32000, [torch.float32, torch.bfloat16]

IMPLS = [
    "credit_ops",
    "credit_ops_seq_adv",
    "credit_ops_inplace",
    "credit_ops_inplace_cluster",
    "credit_ops_aligned_view",
    "credit_ops_two_pass",
    "credit_ops_cluster",
    "eager",
    "torch_compile",
    "liger",
]


def _liger():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        return None
    return triton_grpo_loss


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def inputs(request):
    torch.manual_seed(0)
    full = (torch.randn(B, T + 1, V, device=DEVICE) * 3).to(request.param)  # model output incl. the last position
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    with torch.no_grad():
        cur = credit_ops.token_logprobs(full[:, :-1], labels)
    old = cur + 0.1 * torch.randn_like(cur)
    ref = cur + 0.1 * torch.randn_like(cur)
    mask = torch.rand(B, T, device=DEVICE) > 0.1
    gates = torch.rand(B, T, device=DEVICE)
    return full, labels, old, ref, mask, gates


_compiled = {}


@contextlib.contextmanager
def _layout(name):
    """CREDIT_OPS_ROWS_LAYOUT=name for the call (None: credit_ops' own choice)."""
    if name:
        os.environ["CREDIT_OPS_ROWS_LAYOUT"] = name
    try:
        yield
    finally:
        os.environ.pop("CREDIT_OPS_ROWS_LAYOUT", None)


def _compiled_reference():
    if "ref" not in _compiled:
        _compiled["ref"] = torch.compile(reference.policy_loss)
    return _compiled["ref"]


@pytest.mark.parametrize("loss_type", ["dapo"] if DEVICE == "cuda" else ["dapo", "grpo"])  # GPU time is scarce
@pytest.mark.parametrize("impl", IMPLS)
def test_policy_loss_fwd_bwd(benchmark, inputs, impl, loss_type):
    full, labels, old, ref, mask, gates = inputs
    benchmark.group = f"policy_loss fwd+bwd {loss_type} {(B, T, V)} {full.dtype}"
    adv_tok = torch.randn(B, T, device=DEVICE)
    adv_seq = torch.randn(B, device=DEVICE)
    kw = dict(old_logprobs=old, ref_logprobs=ref, mask=mask, loss_type=loss_type, beta=0.04, eps_low=0.2, eps_high=0.28)
    leaf = full.detach().requires_grad_(True)
    # the GPU layouts for long rows, forced (credit_ops picks the fastest by timing once)
    forced = {
        "credit_ops_two_pass": "two_pass",
        "credit_ops_cluster": "cluster",
        "credit_ops_inplace_cluster": "cluster",
    }.get(impl)
    if forced and DEVICE != "cuda":
        pytest.skip("GPU kernel layouts")
    if forced == "cluster" and not cluster_ok(full):
        pytest.skip("the cluster kernel needs a Hopper GPU (and an sm_90a build)")

    if impl.startswith("credit_ops_inplace"):
        # the gradient overwrites the (B, T + 1, V) model output, as Liger's inplace=True does
        x = full.detach().clone().requires_grad_(True)

        def fn():
            with _layout(forced):
                loss, _ = credit_ops.policy_loss(x, labels, adv_tok, gates=gates, inplace_grad=True, **kw)
            torch.autograd.grad(loss, x)

    elif impl == "credit_ops_aligned_view":  # logits[:, :-1]: autograd then builds the full gradient from the slice's

        def fn():
            loss, _ = credit_ops.policy_loss(leaf[:, :-1], labels, adv_tok, gates=gates, **kw)
            torch.autograd.grad(loss, leaf)

    elif impl.startswith("credit_ops"):  # the (B, T + 1, V) model output, last position dropped (Liger's input)
        adv, g = (adv_seq, None) if impl == "credit_ops_seq_adv" else (adv_tok, gates)

        def fn():
            with _layout(forced):
                loss, _ = credit_ops.policy_loss(leaf, labels, adv, gates=g, **kw)
            torch.autograd.grad(loss, leaf)

    elif impl in ("eager", "torch_compile"):
        impl_fn = reference.policy_loss if impl == "eager" else _compiled_reference()

        def fn():
            loss, _ = impl_fn(leaf[:, :-1], labels, adv_tok, gates=gates, **kw)
            torch.autograd.grad(loss, leaf)

    else:
        liger = _liger()
        if liger is None or DEVICE != "cuda":
            pytest.skip("Liger-Kernel not installed (or no CUDA)")
        x = full.detach().clone().requires_grad_(True)

        def fn():  # per-sequence advantages only; logits (B, T+1, V), gradient written into them (inplace)
            per_token, _, _ = liger(
                x,
                old,
                ref,
                labels,
                adv_seq,
                mask,
                temperature=1.0,
                beta=0.04,
                eps_low=0.2,
                eps_high=0.28,
                inplace=True,
                loss_type=loss_type,
            )
            m = mask.to(per_token.dtype)
            if loss_type == "grpo":
                loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
            else:
                loss = (per_token * m).sum() / m.sum().clamp(min=1)
            torch.autograd.grad(loss, x)

    logits_bytes = B * T * V * full.element_size()
    rounds = (5 if impl in ("eager", "torch_compile") else None) if DEVICE == "cuda" else 3
    measure(benchmark, fn, bytes_moved=2 * logits_bytes, impl=impl, loss_type=loss_type, rounds=rounds)


@pytest.mark.parametrize("active", [1.0, 0.5, 0.25, 0.1], ids=lambda f: f"active{f}")
@pytest.mark.parametrize("impl", ACTIVE_IMPLS)
def test_policy_loss_active_fraction(benchmark, inputs, impl, active):
    """Active-token compaction over logits: a fraction f of the valid tokens carries a loss coefficient (gates 1 on
    them, 0 elsewhere; beta = 0). Dense, active_only (the kernel writes the other rows' zero gradient without
    reading their logits) and active_only with whole_batch_entropy (one more read of the other rows) side by side
    for each f; time and peak extra memory."""
    full, labels, old, _, mask, _ = inputs
    benchmark.group = f"policy_loss fwd+bwd, active fraction {active}, {(B, T, V)} {full.dtype}"
    g = torch.Generator(device=DEVICE).manual_seed(1)
    gates = (torch.rand(B, T, device=DEVICE, generator=g) < active).float()
    adv = torch.randn(B, T, device=DEVICE)
    leaf = full.detach().requires_grad_(True)
    opts = dict(active_only=impl != "dense", whole_batch_entropy=impl == "active_only_whole_entropy")

    def fn():
        loss, _ = credit_ops.policy_loss(leaf, labels, adv, old_logprobs=old, mask=mask, gates=gates, **opts)
        torch.autograd.grad(loss, leaf)

    info = dict(impl=impl, active=active, active_tokens=int((mask & (gates > 0)).sum()), valid_tokens=int(mask.sum()))
    if DEVICE == "cpu" and not benchmark.disabled:
        info["peak_extra_GB"] = cpu_peak_extra_gb(fn)
    measure(benchmark, fn, rounds=None if DEVICE == "cuda" else 5, **info)
    record_vs_dense(benchmark, impl)
