"""Fake (meta) kernels for every credit:: op, so torch.compile(fullgraph=True) can trace them."""

import torch

from credit_ops import _triton_ops


def _register(names, fn):
    for name in names:
        torch.library.register_fake(name)(fn)


def _stats_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---- token_logprobs
def _token_logprobs_fwd_fake(logits, labels, temperature, ignore_index, return_entropy):
    bt = logits.shape[:2]
    new = lambda size: logits.new_empty(size, dtype=_stats_dtype(logits))
    return new(bt), new(bt if return_entropy else (0,)), new(bt)


def _token_logprobs_bwd_fake(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return logits.new_empty(logits.shape)


_TRITON = _triton_ops.AVAILABLE
_register(["credit::token_logprobs_fwd"] + ["credit::token_logprobs_fwd_triton"] * _TRITON, _token_logprobs_fwd_fake)
_register(["credit::token_logprobs_bwd"] + ["credit::token_logprobs_bwd_triton"] * _TRITON, _token_logprobs_bwd_fake)


# ---- align_edits
def _align_edits_fake(a, a_lengths, b, b_lengths, insert_anchor):
    (P, La), Lb = a.shape, b.shape[1]
    return (
        a.new_empty((P, La), dtype=torch.bool),
        a.new_empty((P, Lb), dtype=torch.bool),
        a.new_empty((P, La), dtype=torch.int32),
        a.new_empty((P, Lb), dtype=torch.int32),
        a.new_empty((P,), dtype=torch.int32),
    )


_register(["credit::align_edits"], _align_edits_fake)


# ---- advantages
def _adv_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("credit::group_advantages")
def _group_advantages_fake(rewards, group_ids, num_groups, mode, eps):
    return rewards.new_empty(rewards.shape, dtype=_adv_dtype(rewards))


@torch.library.register_fake("credit::ibpo_shaping")
def _ibpo_shaping_fake(rewards, n_correct, n_valid, rho, lam, threshold):
    new = lambda: rewards.new_empty(rewards.shape, dtype=_adv_dtype(rewards))
    return new(), new()


@torch.library.register_fake("credit::token_advantages")
def _token_advantages_fake(
    seq_adv, mask, wrong, has_repair, lengths, starts, sign_guard, unmasked_weight, correct_in_loss
):
    new = lambda: mask.new_empty(mask.shape, dtype=_adv_dtype(seq_adv))
    return new(), new()


@torch.library.register_fake("credit::repair_advantages")
def _repair_advantages_fake(seq_adv, mask, repair_of, selected, lengths, starts):
    new = lambda: mask.new_empty(mask.shape, dtype=_adv_dtype(seq_adv))
    return new(), new()


# ---- policy_loss
def _policy_loss_fwd_fake(
    logits,
    labels,
    advantages,
    weights,
    old_logprobs,
    ref_logprobs,
    temperature,
    ignore_index,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    kl_type,
    write_grad=True,
):
    new = lambda size: logits.new_empty(size, dtype=_stats_dtype(logits))
    bt = logits.shape[:2]
    return new(()), new(bt), new(bt), logits.new_empty(logits.shape if write_grad else (0,))


# The CPU bookkeeping ops (csrc/cpu/policy_loss_inputs.cpp; the wrappers call them only on eager CPU tensors).
@torch.library.register_fake("credit::policy_loss_inputs")
def _policy_loss_inputs_fake(
    labels, advantages, old, ref, mask, gates, weights, logprobs, B, T, vocab, ignore_index, agg, max_length,
    skip_empty_rows, pad_last, flat, float64,
):  # fmt: skip
    size = (B, T + 1 if pad_last else T)
    size = (size[0] * size[1],) if flat else size
    dtype = torch.float64 if float64 else torch.float32
    out = [] if labels is None else [labels.new_empty(size)]
    given = (True, True, old is not None, ref is not None, gates is not None, weights is not None, True)
    return out + [advantages.new_empty(size, dtype=dtype) for g in given if g]


@torch.library.register_fake("credit::policy_loss_cpu")
def _policy_loss_cpu_fake(logits, *args):
    write_grad = args[-1]
    scalars = [logits.new_empty((), dtype=_stats_dtype(logits)) for _ in range(8)]
    return scalars + [logits.new_empty(logits.shape if write_grad else (0,))]


@torch.library.register_fake("credit::fused_linear_policy_loss_cpu")
def _fused_linear_policy_loss_cpu_fake(hidden, weight, bias, *args):
    compute_grad = args[-1]
    scalars = [hidden.new_empty((), dtype=_stats_dtype(hidden)) for _ in range(8)]
    if not compute_grad:
        return scalars + [hidden.new_empty(0) for _ in range(3)]
    return (
        scalars
        + [hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)]
        + [hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)]
    )


@torch.library.register_fake("credit::policy_loss_stats")
def _policy_loss_stats_fake(logp, entropy, valid, advantages, ratio, old, ref, eps_low, eps_high, kl_type):
    return [logp.new_empty(()) for _ in range(7)]


def _policy_loss_rows_fake(
    grad,
    logits,
    labels,
    advantages,
    weights,
    old_logprobs,
    ref_logprobs,
    temperature,
    ignore_index,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    kl_type,
    coef_given,
    write_grad,
):
    new = lambda size: logits.new_empty(size, dtype=_stats_dtype(logits))
    bt = logits.shape[:2]
    return new(()), new(bt), new(bt)


def _fused_linear_policy_loss_fwd_fake(
    hidden,
    weight,
    bias,
    labels,
    advantages,
    weights,
    old_logprobs,
    ref_logprobs,
    temperature,
    ignore_index,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    kl_type,
    chunk_size,
    compute_grad,
):
    new = lambda size: hidden.new_empty(size, dtype=_stats_dtype(hidden))
    n = hidden.shape[0]
    if not compute_grad:
        return new(()), new(n), new(n), hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_b = hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return new(()), new(n), new(n), hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_b


def _fused_linear_logprobs_fwd_fake(hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=_stats_dtype(hidden)), hidden.new_empty(n, dtype=_stats_dtype(hidden))


def _fused_linear_logprobs_bwd_fake(grad_logprobs, hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    grad_b = hidden.new_empty(0) if bias is None else bias.new_empty(bias.shape)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_b


_register(["credit::policy_loss_fwd"] + ["credit::policy_loss_fwd_triton"] * _TRITON, _policy_loss_fwd_fake)
_register(["credit::policy_loss_rows_"], _policy_loss_rows_fake)
for _op, _fake in [
    ("fused_linear_policy_loss_fwd", _fused_linear_policy_loss_fwd_fake),
    ("fused_linear_logprobs_fwd", _fused_linear_logprobs_fwd_fake),
    ("fused_linear_logprobs_bwd", _fused_linear_logprobs_bwd_fake),
]:
    _register([f"credit::{_op}"] + [f"credit::{_op}_triton"] * _TRITON, _fake)
