"""policy_loss: the GRPO-family clipped policy loss with per-token advantages and gates, straight from the logits
(docs/method.md §4).

Layers, top to bottom: the argument preparation shared with the fused LM head (``prepare``: on the CPU one C++ op,
credit::policy_loss_inputs, elsewhere tensor ops); the loss and its statistics from log-probs (the statistics on
the CPU in credit::policy_loss_stats), the production implementation of the formulas (credit_ops.reference holds the
independent oracle); the row-kernel driver, which also picks the long-row layout on CUDA; the in-place autograd
Functions; the public function.
"""

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from credit_ops import _checks, reference
from credit_ops._backend import get_backend, resolve
from credit_ops.ops.token_logprobs import token_logprobs

KL_IDS = {name: i + 1 for i, name in enumerate(reference.KL_TYPES)}  # the kernels' kl_type (0: no KL term)
AGG_IDS = {name: i for i, name in enumerate(reference.AGGREGATIONS)}  # credit::policy_loss_inputs' agg
# The one-call CPU paths of policy_loss and fused_linear_policy_loss (credit::policy_loss_cpu,
# credit::fused_linear_policy_loss_cpu); tests switch them off to compare with the op-by-op path.
ONE_CALL = True


def native_bookkeeping(t: Tensor) -> bool:
    """Whether the per-token bookkeeping (prepare's tensors and checks, the statistics) runs in the CPU ops
    credit::policy_loss_inputs / credit::policy_loss_stats (csrc/cpu/policy_loss_inputs.cpp): one pass each instead
    of ~20 tensor ops, which were most of a call's host overhead. Elsewhere the tensor-op path below computes the
    same tensors bit for bit (the statistics up to summation order): on CUDA (and meta), while torch.compile traces
    (the ops fuse), under the triton backend (so that the Triton interpreter's tests run what a GPU runs) and under
    the reference backend (which needs no compiled extension)."""
    return t.is_cpu and not torch.compiler.is_compiling() and get_backend() in ("auto", "native")


# ---- argument preparation (policy_loss and fused_linear_policy_loss)
class LossOptions(NamedTuple):
    """The scalar options of a policy loss, validated and with their defaults resolved."""

    loss_type: str
    eps_low: float
    eps_high: float
    dual_clip: float | None
    beta: float
    kl_type: str
    agg: str
    max_length: int | None
    empty_rows: str
    temperature: float
    ignore_index: int

    def kernel_params(self) -> dict:
        """The row kernels' scalar arguments, in their order."""
        return dict(
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            dual_clip=float(self.dual_clip or 0.0),
            beta=self.beta,
            kl_type=KL_IDS[self.kl_type] if self.beta else 0,
        )


class TokenInputs(NamedTuple):
    """The per-token inputs of a policy loss, (B, T), in the statistics dtype; every float tensor is 0 on invalid
    tokens (padding may hold anything: -inf old log-probs, NaN advantages). ``w`` is what the row kernels take as
    weights (token_weights), computed once by prepare (None in a TokenInputs built for the statistics alone)."""

    labels: Tensor | None  # int, ignore_index on every invalid token (None when the caller has log-probs)
    valid: Tensor  # 1.0 on valid tokens (labels != ignore_index and mask), else 0.0
    adv: Tensor
    old: Tensor | None
    ref: Tensor | None
    gates: Tensor | None
    weights: Tensor | None
    w: Tensor | None = None  # aggregation weight x valid x gate x weight


@functools.lru_cache(maxsize=256)
def loss_options(
    loss_type, eps_low, eps_high, dual_clip, beta, kl_type, agg, max_length, empty_rows, temperature, ignore_index
) -> LossOptions:
    """The scalar options of a policy loss, validated, with their defaults resolved (cached: a training loop passes
    the same ones every step, and their checks were a tenth of a call's host time)."""
    _checks.check(
        loss_type in reference.LOSS_TYPES,
        lambda: f"unknown loss_type {loss_type!r}; expected one of {reference.LOSS_TYPES}",
    )
    agg = reference.DEFAULT_AGG[loss_type] if agg is None else agg
    _checks.check(
        agg in reference.AGGREGATIONS,
        lambda: f"unknown agg {agg!r}; expected one of {reference.AGGREGATIONS} (or None)",
    )
    _checks.check(
        kl_type in reference.KL_TYPES, lambda: f"unknown kl_type {kl_type!r}; expected one of {reference.KL_TYPES}"
    )
    low, high = reference.DEFAULT_EPS[loss_type]
    eps_low = low if eps_low is None else float(eps_low)
    eps_high = high if eps_high is None else float(eps_high)
    _checks.check(
        eps_low >= 0 and eps_high >= 0, lambda: f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}"
    )
    _checks.check(eps_low <= 1, lambda: f"eps_low must be <= 1 (the lower clip bound is 1 - eps_low), got {eps_low}")
    _checks.check(dual_clip is None or dual_clip > 1, lambda: f"dual_clip must be None or > 1, got {dual_clip}")
    _checks.check(beta >= 0, lambda: f"beta must be >= 0, got {beta}")
    _checks.check(
        agg != "seq_mean_token_sum_norm" or (max_length is not None and max_length > 0),
        lambda: (
            f"agg='seq_mean_token_sum_norm' (the default of loss_type='dr_grpo') needs max_length > 0, got {max_length}"
        ),
    )
    _checks.check(
        empty_rows in reference.EMPTY_ROWS,
        lambda: f"empty_rows must be one of {reference.EMPTY_ROWS}, got {empty_rows!r}",
    )
    _checks.check(temperature > 0, lambda: f"temperature must be > 0, got {temperature}")
    return LossOptions(
        loss_type,
        eps_low,
        eps_high,
        dual_clip,
        float(beta),
        kl_type,
        agg,
        max_length,
        empty_rows,
        float(temperature),
        int(ignore_index),
    )


def prepare(
    labels,
    V,
    advantages,
    *,
    old_logprobs,
    ref_logprobs,
    mask,
    gates,
    weights,
    loss_type,
    eps_low,
    eps_high,
    dual_clip,
    beta,
    kl_type,
    agg,
    max_length,
    empty_rows,
    temperature,
    ignore_index,
    acc,
    shape=None,
    logprobs=None,
    pad_last=False,
    flat=False,
    build=True,
) -> tuple[LossOptions, TokenInputs | None]:
    """Validate a policy loss's arguments and resolve them: labels (B, T) against a vocabulary of V, or, for a loss
    from log-probs, labels None, the (B, T) ``shape`` and the ``logprobs`` (checked finite on valid tokens).
    ``pad_last``: the inputs get one more, ignored, position (B, T + 1), for logits with the model's last position;
    ``flat``: they are flattened to (B T,), the fused LM head's rows. ``build=False``: the checks of the arguments'
    types and shapes alone (inputs None), for a caller whose kernel builds the inputs itself."""
    try:
        options = loss_options(
            loss_type, eps_low, eps_high, dual_clip, beta, kl_type, agg, max_length, empty_rows, temperature,
            ignore_index,
        )  # fmt: skip
    except TypeError:  # an unhashable option (a 0-d tensor): validate it uncached
        options = loss_options.__wrapped__(
            loss_type, eps_low, eps_high, dual_clip, beta, kl_type, agg, max_length, empty_rows, temperature,
            ignore_index,
        )  # fmt: skip
    agg = options.agg
    _checks.check(
        beta == 0 or ref_logprobs is not None, "beta > 0 needs ref_logprobs (the reference policy's log-probs)"
    )

    if labels is not None:
        _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES, dim=2)
    B, T = labels.shape if labels is not None else shape
    _checks.tensor("advantages", advantages, dtypes=_checks.FLOAT_DTYPES)
    _checks.check(
        tuple(advantages.shape) in ((B,), (B, T)),
        lambda: (
            f"advantages must have shape ({B},) (per sequence) or ({B}, {T}) (per token), got {tuple(advantages.shape)}"
        ),
    )
    optional = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, mask=mask, gates=gates, weights=weights)
    for name, t in optional.items():
        if t is not None:
            _checks.tensor(name, t, dtypes=None if name == "mask" else _checks.FLOAT_DTYPES)
            _checks.shape(name, t, (B, T), "(that of labels)" if labels is not None else "(that of logprobs)")
    _checks.same_device(labels=labels, advantages=advantages, **optional)
    if not build:
        return options, None
    if native_bookkeeping(advantages):
        tensors = torch.ops.credit.policy_loss_inputs(
            labels, advantages, old_logprobs, ref_logprobs, mask, gates, weights, logprobs, B, T, V or 0,
            options.ignore_index, AGG_IDS[agg], max_length or 0, empty_rows == "skip", pad_last, flat,
            acc == torch.float64,
        )  # fmt: skip
        given = iter(tensors)  # the op leaves out the tensors not given
        take = lambda t: None if t is None else next(given)
        labels, valid, adv = take(labels), next(given), next(given)
        return options, TokenInputs(
            labels, valid, adv, *map(take, (old_logprobs, ref_logprobs, gates, weights)), next(given)
        )
    if gates is not None:
        _checks.within_range(gates, 0, 1, "gates must lie in [0, 1]")

    if labels is not None:
        _checks.ids_in_range("labels", labels, V, ignore_index=ignore_index)
        valid = labels != ignore_index
        if mask is not None:
            valid = valid & (mask != 0)
    else:
        valid = torch.ones((B, T), dtype=torch.bool, device=advantages.device) if mask is None else mask != 0
    adv = advantages.to(acc)
    adv = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv
    # Padding may hold anything; on valid tokens a NaN or inf would silently make the loss NaN or inf.
    per_token = dict(advantages=adv, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, weights=weights)
    _checks.finite_each(per_token, "{name} must be finite on valid tokens (found NaN or inf)", where=valid)
    if weights is not None:
        _checks.within_range(weights, 0, None, "weights must be >= 0", where=valid)
    if logprobs is not None:
        _checks.finite_each({"logprobs": logprobs}, "{name} must be finite on valid tokens", where=valid)
    cast = lambda t: None if t is None else torch.where(valid, t.to(acc), 0.0)
    inputs = TokenInputs(
        None if labels is None else torch.where(valid, labels, ignore_index),
        valid.to(acc),
        cast(adv),
        cast(old_logprobs),
        cast(ref_logprobs),
        cast(gates),
        cast(weights),
    )
    if pad_last:
        pad = lambda t, fill=0: None if t is None else torch.cat([t, t.new_full((B, 1), fill)], 1)
        inputs = TokenInputs(pad(inputs.labels, options.ignore_index), *map(pad, inputs[1:7]))
    inputs = inputs._replace(w=token_weights(inputs, options))
    return options, TokenInputs(*(None if t is None else t.reshape(-1) for t in inputs)) if flat else inputs


# ---- the loss from log-probs: docs/method.md §4
def aggregation_weights(valid: Tensor, agg: str, max_length: int | None, empty_rows: str) -> Tensor:
    """(B, T) w with loss = sum_bt w_bt loss_bt; 0 on invalid tokens, denominators count valid tokens, and the
    sequence means count the rows (empty_rows="count") or only the rows with a valid token ("skip")."""
    B = valid.shape[0] if empty_rows == "count" else (valid.sum(1) > 0).to(valid.dtype).sum().clamp(min=1.0)
    if agg == "token_mean":
        denominator = valid.sum().clamp(min=1.0)
    elif agg == "seq_mean_token_mean":
        denominator = valid.sum(1, keepdim=True).clamp(min=1.0) * B
    elif agg == "seq_mean_token_sum":
        denominator = B
    else:  # seq_mean_token_sum_norm (prepare() admits no other name)
        denominator = B * max_length
    return valid / denominator


def token_factors(inputs: TokenInputs) -> Tensor:
    """valid x gate x weight (B, T): what multiplies each token's loss before the aggregation."""
    w = inputs.valid
    for factor in (inputs.gates, inputs.weights):
        if factor is not None:
            w = w * factor
    return w


def token_weights(inputs: TokenInputs, options: LossOptions) -> Tensor:
    """The per-token multipliers of the aggregated loss (the row kernels' weights): aggregation weight x factors."""
    return aggregation_weights(inputs.valid, options.agg, options.max_length, options.empty_rows) * token_factors(
        inputs
    )


def kl_penalty(logp: Tensor, ref: Tensor, kl_type: str) -> Tensor:
    """Schulman's estimators of KL(pi || pi_ref) per token, from x = logp - ref: k1 = x, k2 = x^2 / 2,
    k3 = exp(-x) + x - 1."""
    x = logp - ref
    if kl_type == "k1":
        return x
    if kl_type == "k2":
        return x.square() * 0.5
    return torch.expm1(-x) + x


def importance_ratio(logp: Tensor, inputs: TokenInputs, loss_type: str) -> Tensor:
    """(B, T) ratio of each loss type, differentiable w.r.t. logp: per token for the token losses, one per sequence
    (the exp of the mean log-ratio over its valid tokens; gate-weighted for gated_gspo) for the GSPO family."""
    old = logp.detach() if inputs.old is None else inputs.old
    log_ratio = logp - old
    if loss_type in reference.TOKEN_LOSSES:
        return log_ratio.exp()
    gated = loss_type == "gated_gspo" and inputs.gates is not None
    w = inputs.valid * inputs.gates if gated else inputs.valid
    total = w.sum(1, keepdim=True)
    seq = torch.where(total > 0, (w * log_ratio).sum(1, keepdim=True) / torch.where(total > 0, total, 1.0), 0.0)
    ratio = seq.exp()
    if loss_type == "gspo_token":  # the sequence ratio's value, each token's own gradient
        return ratio.detach() * (logp - logp.detach()).exp()
    return ratio.expand_as(logp)


def loss_stats(ratio, logp: Tensor, entropy, inputs: TokenInputs, options: LossOptions) -> dict:
    """Detached means over valid tokens (no host synchronisation): TRL's clip fractions (a ratio below 1 - eps_low
    where A < 0, above 1 + eps_high where A > 0), the ratio, the KL estimate, the entropy, and the token count.
    ``ratio`` (B, T), or None for each token's exp(logp - old) (1 on-policy); ``entropy`` (B, T) or None (0)."""
    if native_bookkeeping(logp):
        values = torch.ops.credit.policy_loss_stats(
            logp, entropy, inputs.valid, inputs.adv, ratio, inputs.old, inputs.ref,
            options.eps_low, options.eps_high, KL_IDS[options.kl_type],
        )  # fmt: skip
        return dict(zip(reference.STAT_NAMES, values, strict=True))
    with torch.no_grad():
        if ratio is None:
            ratio = torch.ones_like(logp) if inputs.old is None else torch.exp(logp - inputs.old)
        adv, valid = inputs.adv, inputs.valid
        below = (ratio < 1.0 - options.eps_low) & (adv < 0)
        above = (ratio > 1.0 + options.eps_high) & (adv > 0)
        kl = torch.zeros_like(logp) if inputs.ref is None else kl_penalty(logp, inputs.ref, options.kl_type)
        entropy = torch.zeros_like(logp) if entropy is None else torch.where(valid > 0, entropy.to(logp.dtype), 0.0)
        per_token = torch.stack(
            [below.to(logp.dtype), above.to(logp.dtype), (below | above).to(logp.dtype), ratio, kl, entropy]
        ).flatten(1)
        count = valid.sum()
        means = (per_token @ valid.flatten()) / count.clamp(min=1.0)  # the six masked means in one reduction
        return dict(zip(reference.STAT_NAMES, (*means.unbind(), count), strict=True))


def loss_from_logprobs(logp: Tensor, entropy: Tensor, inputs: TokenInputs, options: LossOptions, reduction="mean"):
    """(loss, stats) from per-token log-probs (B, T), the loss differentiable w.r.t. logp (0 gradient on invalid
    tokens); entropy (B, T) or None feeds the statistics only. reduction="none": the loss per token (B, T), gated and
    weighted, before the aggregation weights."""
    logp = torch.where(inputs.valid > 0, logp, 0.0)
    ratio = importance_ratio(logp, inputs, options.loss_type)
    adv = inputs.adv
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - options.eps_low, 1.0 + options.eps_high) * adv)
    per_token = -surrogate
    if options.dual_clip is not None:  # bound the loss of a negative advantage by -c A
        per_token = torch.where(adv < 0, torch.minimum(per_token, -options.dual_clip * adv), per_token)
    if options.beta != 0.0:
        per_token = per_token + options.beta * kl_penalty(logp, inputs.ref, options.kl_type)
    stats = loss_stats(ratio, logp, entropy, inputs, options)
    if reduction == "none":
        return token_factors(inputs) * per_token, stats
    return (inputs.w * per_token).sum(), stats


# ---- active-token compaction (active_only=True of policy_loss and fused_linear_policy_loss)
def active_tokens(factors: Tensor, advantages: Tensor, beta: float) -> Tensor:
    """(B, T) bool: the tokens whose loss coefficient w x dloss/dlogp can be nonzero, the one rule of active_only.
    ``factors`` (B, T) is zero exactly where a token's multiplier is (the row kernels' weights: aggregation weight x
    valid x gate x weight; or valid x gates x weights, which have the same zeros); with beta = 0 a zero advantage
    zeroes the clipped surrogate and its derivative too. Every other token has loss 0 and d loss / d logits 0 (a NaN
    logit would make them NaN in the dense computation; active_only never reads it)."""
    carries = factors != 0
    return carries if beta else carries & (advantages != 0)


def active_stats(logp, entropy, inputs: TokenInputs, options: LossOptions, inactive_entropy=None) -> dict:
    """loss_stats of an active_only call: logp, entropy and ``inputs`` hold the active tokens (``inputs.valid``
    1 on them, 0 elsewhere), so the means and num_tokens cover the active tokens. ``inactive_entropy``, a pair of
    0-d tensors (summed entropy, count) of the valid tokens left out (whole_batch_entropy=True), makes entropy_mean
    the mean over every valid token, as in the dense computation."""
    stats = loss_stats(None, logp, entropy, inputs, options)
    if inactive_entropy is not None:
        inactive_sum, inactive_count = inactive_entropy
        total = stats["entropy_mean"] * stats["num_tokens"] + inactive_sum.to(stats["entropy_mean"].dtype)
        stats["entropy_mean"] = total / (stats["num_tokens"] + inactive_count).clamp(min=1.0)
    return stats


# ---- the row kernels and the long-row layout
ROWS_LAYOUTS = ("two_pass", "cluster")


def cluster_ok(logits: Tensor) -> bool:
    """Whether the extension's Hopper cluster kernel takes these logits (sm_90, fp32/bf16/fp16, 16-byte rows)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("credit::policy_loss_rows_", "CUDA"):
        return False  # extension built without CUDA
    return torch.ops.credit.policy_loss_cluster_ok(logits)


def rows_forward(
    grad,
    logits,
    labels,
    advantages,
    weights,
    old,
    ref,
    *,
    use_triton: bool,
    temperature: float,
    ignore_index: int,
    eps_low: float = 0.0,
    eps_high: float = 0.0,
    dual_clip: float = 0.0,
    beta: float = 0.0,
    kl_type: int = 0,
    coef_given: bool = False,
    write_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The token-level policy-loss row kernel: logits (B, T, V) (unit stride along V) -> loss (), logprobs and
    entropy (B, T); with ``write_grad`` it writes d loss / d logits into ``grad`` (B, T, V), which may be ``logits``
    itself (in place). Per-token tensors (B, T) contiguous in the statistics dtype; ``weights`` = aggregation weight
    x gate, or with ``coef_given`` the coefficients dL/dlogp (a log-prob backward; loss 0). Without ``write_grad``
    it is a log-prob + entropy forward (``grad`` is then not written; pass the logits).

    CPU (``use_triton`` False): the C++ kernel. Otherwise the Triton kernel, or the Hopper thread-block-cluster
    kernel where CREDIT_OPS_ROWS_LAYOUT=cluster asks for it (_layout)."""
    scalars = (temperature, ignore_index, eps_low, eps_high, dual_clip, beta, kl_type)
    if not use_triton:
        return torch.ops.credit.policy_loss_rows_(
            grad, logits, labels, advantages, weights, old, ref, *scalars, coef_given, write_grad
        )
    tensors = (labels, advantages, weights, old, ref)
    runs = _layouts(grad, logits, tensors, scalars, coef_given, write_grad)
    loss, logp, entropy = runs[_layout(runs)]()
    return (logp.new_zeros(()) if coef_given else loss), logp, entropy


def _layouts(grad, logits, tensors, scalars, coef_given, write_grad) -> dict:
    """The kernels that can take this call, as closures returning (loss, logp, entropy)."""
    from credit_ops.triton_kernels.policy_loss import one_tile, policy_loss_forward

    temperature, ignore_index, eps_low, eps_high, dual_clip, beta, kl_type = scalars
    labels, _, weights, _, _ = tensors

    def two_pass():
        return policy_loss_forward(
            logits,
            *tensors,
            temperature=temperature,
            ignore_index=ignore_index,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            beta=beta,
            kl_type=kl_type,
            grad=grad,
            write_grad=write_grad,
            coef_given=coef_given,
        )[:3]

    def cluster():  # the CUDA Hopper kernel (csrc/cuda/policy_loss.cu): the same outputs
        return torch.ops.credit.policy_loss_rows_(grad, logits, *tensors, *scalars, coef_given, True)

    runs = {"two_pass": two_pass}
    V = logits.shape[-1]
    wanted = os.environ.get("CREDIT_OPS_ROWS_LAYOUT") == "cluster"  # the only way it runs (_layout): ask only then
    if wanted and write_grad and labels.numel() and not one_tile(V) and logits.is_cuda and weights is not None:
        if cluster_ok(logits):
            runs["cluster"] = cluster
    return runs


def _layout(runs) -> str:
    """Which long-row kernel runs: a fixed rule, never a timing race, so that no row's log-prob depends on the
    batch or on which kernel won a race. The Triton kernel by default: its row reduction is the one token_logprobs
    and the fused LM head run (triton_kernels/softmax_rows.py), so all of them give a row the same bits. The Hopper
    cluster kernel reduces a row in its own order (still a function of the row, V and the device alone, but other
    bits than token_logprobs'), so it runs only when CREDIT_OPS_ROWS_LAYOUT=cluster forces it
    (CREDIT_OPS_ROWS_LAYOUT=two_pass forces the default)."""
    forced = os.environ.get("CREDIT_OPS_ROWS_LAYOUT")
    if forced:
        if forced not in ROWS_LAYOUTS:
            raise ValueError(f"CREDIT_OPS_ROWS_LAYOUT must be one of {ROWS_LAYOUTS}, got {forced!r}")
        if forced not in runs:
            raise ValueError(
                f"CREDIT_OPS_ROWS_LAYOUT={forced}: that kernel cannot take this call (available: {sorted(runs)}; "
                "cluster: rows over 16384 logits to write a gradient for, on a Hopper GPU, V x element size a "
                "multiple of 16 bytes)"
            )
        return forced
    return "two_pass"


# ---- in-place autograd Functions
class _PolicyLossInplace(torch.autograd.Function):
    """Token-level loss writing d loss / d logits into the logits' own storage (inplace_grad=True)."""

    @staticmethod
    def forward(ctx, logits, labels, adv, weights, old, ref, params, use_triton):
        x = logits.detach()
        loss, logp, entropy = rows_forward(x, x, labels, adv, weights, old, ref, use_triton=use_triton, **params)
        # The kernels wrote through a pointer: bump the version so autograd catches any saved use of the logits.
        torch.autograd.graph.increment_version(x)
        ctx.grad = x
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        return _scaled_inplace_grad(ctx, grad_loss), *(None,) * 7


class _SeqPolicyLossInplace(torch.autograd.Function):
    """GSPO family with inplace_grad=True: log-probs (one read), d loss / d logp from the O(B T) scalar graph, then
    d loss / d logits written over the logits (a second read, one write), all in the forward."""

    @staticmethod
    def forward(ctx, logits, inputs, options, use_triton):
        x = logits.detach()
        labels = inputs.labels.contiguous()
        rows = dict(
            use_triton=use_triton, temperature=options.temperature, ignore_index=options.ignore_index, coef_given=True
        )
        _, logp, entropy = rows_forward(
            x, x, labels, None, torch.zeros_like(inputs.valid), None, None, write_grad=False, **rows
        )
        with torch.enable_grad():
            leaf = logp.detach().requires_grad_(True)
            loss, stats = loss_from_logprobs(leaf, entropy, inputs, options)
            (coef,) = torch.autograd.grad(loss, leaf)
        rows_forward(x, x, labels, None, coef.contiguous(), None, None, **rows)
        torch.autograd.graph.increment_version(x)  # the kernels wrote through a pointer
        ctx.grad = x
        values = tuple(stats[k] for k in reference.STAT_NAMES)
        ctx.mark_non_differentiable(*values)
        return loss.detach(), *values

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        return _scaled_inplace_grad(ctx, grad_loss), None, None, None


def _scaled_inplace_grad(ctx, grad_loss):
    grad = ctx.grad
    if grad_loss is None:
        return None
    if bool(grad_loss != 1):
        grad.mul_(grad_loss.to(grad.dtype))
    return grad


# ---- the public functions
def reference_options(options: LossOptions, old_logprobs, ref_logprobs, gates, weights) -> dict:
    """The reference backend's keyword arguments for the same loss."""
    return dict(
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        gates=gates,
        weights=weights,
        loss_type=options.loss_type,
        eps_low=options.eps_low,
        eps_high=options.eps_high,
        dual_clip=options.dual_clip,
        beta=options.beta,
        kl_type=options.kl_type,
        agg=options.agg,
        max_length=options.max_length,
        empty_rows=options.empty_rows,
    )


def policy_loss_from_logprobs(
    logprobs: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    gates: Tensor | None = None,
    weights: Tensor | None = None,
    entropy: Tensor | None = None,
    loss_type: str = "dapo",
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    agg: str | None = None,
    max_length: int | None = None,
    empty_rows: str = "count",
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`policy_loss` for callers that hold the log-probs already (verl, OpenRLHF, TRL's own head, a fused
    head of one's own): the same loss types, options, validation and statistics, differentiable w.r.t. ``logprobs``
    (no gradient reaches masked tokens).

    ``reduction="mean"`` aggregates with ``agg`` (the default of the loss type when None) into a scalar;
    ``reduction="none"`` returns the loss per token, mask x gates x weights x loss_t (0 on masked tokens), for a
    framework that aggregates it its own way. ``entropy`` (B, T), optional, feeds ``stats["entropy_mean"]``
    (0 without it).

    Shapes:
        logprobs: (B, T) float16 / bfloat16 / float32 / float64, finite on valid tokens
        advantages: (B,) per sequence or (B, T) per token
        old_logprobs, ref_logprobs, gates, weights, entropy: (B, T) float; mask: (B, T) bool or numeric
        returns: loss () or, with reduction="none", (B, T), float32 (float64 for float64 logprobs); stats (see
            policy_loss)
    """
    _checks.tensor("logprobs", logprobs, dtypes=_checks.FLOAT_DTYPES, dim=2)
    _checks.check(reduction in ("mean", "none"), lambda: f"reduction must be 'mean' or 'none', got {reduction!r}")
    if entropy is not None:
        _checks.tensor("entropy", entropy, dtypes=_checks.FLOAT_DTYPES)
        _checks.shape("entropy", entropy, logprobs.shape, "(that of logprobs)")
    _checks.same_device(logprobs=logprobs, advantages=advantages, entropy=entropy)
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    options, inputs = prepare(
        None,
        None,
        advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        mask=mask,
        gates=gates,
        weights=weights,
        loss_type=loss_type,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        beta=beta,
        kl_type=kl_type,
        agg=agg,
        max_length=max_length,
        empty_rows=empty_rows,
        temperature=1.0,
        ignore_index=-100,
        acc=acc,
        shape=tuple(logprobs.shape),
        logprobs=logprobs,
    )
    if resolve(logprobs.device, triton=False) == "reference":
        return reference.policy_loss_from_logprobs(
            logprobs,
            advantages,
            mask=mask,
            entropy=entropy,
            reduction=reduction,
            **reference_options(options, old_logprobs, ref_logprobs, gates, weights),
        )
    return loss_from_logprobs(logprobs.to(acc), entropy, inputs, options, reduction)


def policy_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    mask: Tensor | None = None,
    gates: Tensor | None = None,
    weights: Tensor | None = None,
    loss_type: str = "dapo",
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    agg: str | None = None,
    max_length: int | None = None,
    empty_rows: str = "count",
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_grad: bool = False,
    active_only: bool = False,
    whole_batch_entropy: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family clipped policy loss with per-token advantages and gates, straight from the logits
    (docs/method.md §4).

    ``logits[:, t]`` scores ``labels[:, t]``: pass logits already shifted against the labels (for a causal LM,
    ``logits[:, :-1]`` with ``labels = input_ids[:, 1:]``; the strided slice is read in place, not copied), or the
    model's full ``(B, T + 1, V)`` output, whose last position is then dropped (TRL / Liger's convention). The full
    output is cheaper in training: the gradient is written for the whole tensor, while a slice's gradient needs
    autograd to allocate a zeroed (B, T + 1, V) buffer and copy into it.
    With logp_t = log softmax(logits_t / T)[labels_t], l_t = logp_t - old_t, valid tokens M_t (mask and
    labels != ignore_index), gates g_t in [0, 1] (1 when None), weights u_t >= 0 (1 when None):

        grpo / dapo / dr_grpo / bnpo:  r_t = exp(l_t)
        gspo:        r_t = s_b = exp(sum_t M_t l_t / sum_t M_t)        (one ratio per sequence)
        gspo_token:  r_t = sg(s_b) * exp(logp_t - sg(logp_t))         (per-token advantages keep own gradient)
        gated_gspo:  r_t = s_b = exp(sum_t g_t M_t l_t / sum_t g_t M_t)  (IOP; only gated tokens get gradient)
        loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)  [min(., -dual_clip A_t) where A_t < 0]
                 + beta * KL_t(k1 | k2 | k3 against ref_logprobs)
        loss = sum_bt w_bt g_t u_t loss_t, with w the aggregation weights (denominators count valid tokens):
            token_mean 1 / sum M; seq_mean_token_mean 1 / (B |y_b|); seq_mean_token_sum 1 / B;
            seq_mean_token_sum_norm 1 / (B max_length)

    Gates are credit (which tokens the update may touch); ``weights`` are unbounded importance-sampling
    corrections (TRL's vLLM IS ratio, verl's ``rollout_is_weights``) that multiply the token's loss and leave the
    ratio, the statistics and the denominators alone. ``empty_rows="skip"`` leaves rows without a valid token out
    of B in the sequence means (verl and OpenRLHF do; TRL counts them: "count", the default).

    ``agg=None`` takes TRL's aggregation of the loss type (grpo: seq_mean_token_mean; dapo, bnpo: token_mean;
    dr_grpo: seq_mean_token_sum_norm, which needs ``max_length``; GSPO family: seq_mean_token_mean, the mean of
    the per-sequence losses). ``eps_low/eps_high=None`` take 0.2 / 0.28 for token ratios and 3e-4 / 4e-4 for the
    GSPO family. ``old_logprobs=None`` is on-policy: ratio 1, gradient still flowing.

    Token-level types run one fused kernel that reads each logit once per pass and writes d loss / d logits during
    the forward (backward only scales it by the incoming gradient, skipping even that when it is 1); the GSPO
    family runs a log-prob pass, O(B T) scalar math, and one gradient pass in backward. ``inplace_grad=True``
    (off by default) writes the gradient into the logits' own storage, during the forward, instead of a new
    (B, T, V) buffer: the logits' values are destroyed by the forward, so nothing else may need them later (autograd
    raises if a saved tensor is overwritten); eager mode only.

    ``active_only=True`` (token-level types) has the kernel skip the rows whose loss coefficient is exactly 0
    (``active_tokens``: aggregation weight x gate x weight = 0, or, with beta = 0, advantage 0): it writes their
    gradient row as zeros without reading their logits. Loss and gradient are the dense computation's bit for bit
    (a NaN logit in a skipped row aside: never read, it no longer makes the loss NaN); no host synchronisation.
    The statistics then cover the active tokens only (num_tokens counts them); ``whole_batch_entropy=True`` adds
    one log-prob + entropy read of the skipped valid rows so that entropy_mean is the dense one, over every valid
    token (the other means stay over the active tokens); that read costs about what skipping saved (on the CPU the
    call then takes about the dense time). The GSPO family and the reference backend compute densely.

    Shapes:
        logits: (B, T, V) or (B, T + 1, V) bfloat16 / float16 / float32 / float64, unit stride along V
        labels: (B, T) int32 / int64 in [0, V) or ``ignore_index``
        advantages: (B,) per sequence or (B, T) per token
        old_logprobs, ref_logprobs, gates, weights: (B, T) float; mask: (B, T) bool or numeric (nonzero = valid)
        returns: loss () float32 (float64 for float64 logits), differentiable w.r.t. logits; stats: dict of
            detached 0-d tensors clip_frac_low, clip_frac_high, clip_frac, ratio_mean, kl_mean, entropy_mean,
            num_tokens (means over valid tokens; no host synchronisation)
    """
    _checks.tensor("logits", logits, dtypes=_checks.FLOAT_DTYPES, dim=3)
    _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES, dim=2)
    B, T = labels.shape
    _checks.check(
        logits.shape[0] == B and logits.shape[1] in (T, T + 1),
        lambda: (
            f"logits {tuple(logits.shape)} must be (B, T, V) aligned with labels {tuple(labels.shape)}, or the "
            "model's full (B, T + 1, V) output whose last position is dropped"
        ),
    )
    _checks.check(logits.shape[-1] > 0, "logits must have a non-empty vocabulary dimension")
    _checks.same_device(logits=logits, labels=labels)
    # A token-level loss on CPU tensors, eager, written to a new gradient buffer: one C++ call does it all.
    one_call = (
        ONE_CALL
        and loss_type in reference.TOKEN_LOSSES
        and not (inplace_grad and logits.requires_grad and torch.is_grad_enabled())
        and not (active_only and whole_batch_entropy)
        and native_bookkeeping(logits)
    )
    options, inputs = prepare(
        labels,
        logits.shape[-1],
        advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        mask=mask,
        gates=gates,
        weights=weights,
        loss_type=loss_type,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        beta=beta,
        kl_type=kl_type,
        agg=agg,
        max_length=max_length,
        empty_rows=empty_rows,
        temperature=temperature,
        ignore_index=ignore_index,
        acc=torch.float64 if logits.dtype == torch.float64 else torch.float32,
        # The model's full output: score it in place with an ignored last position, so the gradient is written for
        # the whole tensor (zero last row) and autograd needs no (B, T + 1, V) buffer for a slice's backward.
        pad_last=logits.shape[1] == T + 1,
        build=not one_call,
    )
    if one_call:
        out = torch.ops.credit.policy_loss_cpu(
            logits, labels, advantages, old_logprobs, ref_logprobs, mask, gates, weights, options.temperature,
            options.ignore_index, options.eps_low, options.eps_high, float(options.dual_clip or 0.0), options.beta,
            KL_IDS[options.kl_type], AGG_IDS[options.agg], options.max_length or 0, options.empty_rows == "skip",
            active_only, torch.is_grad_enabled() and logits.requires_grad,
        )  # fmt: skip
        return out[0], dict(zip(reference.STAT_NAMES, out[1:8], strict=True))
    backend = resolve(logits.device, triton=True)
    if backend == "reference":
        return reference.policy_loss(
            logits[:, :T],
            labels,
            advantages,
            mask=mask,
            temperature=temperature,
            ignore_index=ignore_index,
            **reference_options(options, old_logprobs, ref_logprobs, gates, weights),
        )
    use_triton = backend == "triton"
    scored = inputs
    inplace = inplace_grad and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        _checks.check(logits.is_contiguous(), "inplace_grad=True needs contiguous logits")
    if loss_type in reference.SEQUENCE_LOSSES:
        if inplace:
            loss, *values = _SeqPolicyLossInplace.apply(logits, scored, options, use_triton)
            return loss, dict(zip(reference.STAT_NAMES, values, strict=True))
        logp, entropy = token_logprobs(
            logits,
            scored.labels,
            temperature=options.temperature,
            ignore_index=options.ignore_index,
            return_entropy=True,
        )
        return loss_from_logprobs(logp, entropy, scored, options)
    params = options.kernel_params()
    c = lambda t: None if t is None else t.contiguous()
    w = scored.w
    labels_k, inactive_entropy = scored.labels, None
    if active_only:
        # A skipped row is an ignored row to the kernels (zero gradient row, logits unread, logp = entropy = 0).
        active = active_tokens(w, scored.adv, options.beta)
        labels_k = torch.where(active, scored.labels, options.ignore_index)
        if whole_batch_entropy:  # the skipped valid rows' entropy, before an in-place kernel overwrites them
            x, left = logits.detach(), torch.where(active, options.ignore_index, scored.labels)
            _, _, ent = rows_forward(
                x,
                x,
                left,
                None,
                torch.zeros_like(scored.valid),
                None,
                None,
                use_triton=use_triton,
                temperature=options.temperature,
                ignore_index=options.ignore_index,
                coef_given=True,
                write_grad=False,
            )
            inactive_entropy = (ent.sum(), (scored.valid.sum() - active.sum()).to(ent.dtype))
        scored = scored._replace(valid=active.to(scored.valid.dtype))
    args = (c(scored.adv), w.contiguous(), c(scored.old), c(scored.ref))
    if inplace:
        loss, logp, entropy = _PolicyLossInplace.apply(logits, labels_k.contiguous(), *args, params, use_triton)
    else:
        op = torch.ops.credit.policy_loss_fwd_triton if use_triton else torch.ops.credit.policy_loss_fwd
        write_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, logp, entropy, _ = op(logits, labels_k, *args, *params.values(), write_grad)
    if active_only:
        return loss, active_stats(logp, entropy, scored, options, inactive_entropy)
    return loss, loss_stats(None, logp, entropy, scored, options)
