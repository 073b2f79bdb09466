"""The fused LM head: policy loss and log-probs of logits = hidden @ weight.T (+ bias), chunk by chunk over tokens,
never the full (N, V) logits.

Per chunk of n tokens: one matmul (tensor cores, fp32 accumulation, logits in the operands' dtype) into an (n, V)
buffer, then the policy-loss row kernel (ops/policy_loss.py rows_forward: Triton on GPU, C++ on CPU) computes
lse / logp / entropy / the loss in fp32 and overwrites the buffer with d loss / d logits, then the two gradient
matmuls read it: grad_hidden[chunk] = dlogits @ W and grad_W += dlogits.T @ hidden[chunk]. Token-level losses
thus cost the three matmuls plus one read and one write of each chunk, and need one chunk buffer of memory.
Sequence-level losses chunk by whole sequences and take the coefficients from the scalar graph between the
log-prob pass and the gradient pass (sequence_loss_forward): three matmuls too. The same loops serve every
device: the Triton custom ops (_triton_ops.py) and the CPU kernels of the credit::fused_linear_* ops (registered
at the bottom of this file) differ only in the row kernel.

Why cuBLAS and not a Triton tensor-core matmul with the softmax fused into it: the three matmuls are the floor
and cuBLAS runs them near the card's rate; fusing the row statistics into the logits matmul's epilogue would save
one read of each chunk (~0.15 ms per 2048 x 152k bf16 chunk on an H200, of ~10 ms of matmuls), and computing the
gradient inside the gradient matmuls' prologue would recompute exp() once per H tile (14-28x the exponentials).
"""

import functools

import torch
from torch import Tensor

from credit_ops import _checks, reference
from credit_ops._backend import resolve
from credit_ops.ops import policy_loss as _policy_loss
from credit_ops.ops.policy_loss import (
    AGG_IDS,
    KL_IDS,
    TokenInputs,
    active_stats,
    active_tokens,
    loss_from_logprobs,
    loss_stats,
    native_bookkeeping,
    prepare,
    reference_options,
    rows_forward,
)

# One logits chunk: ~1 GiB (2048 tokens at V = 152k, bf16). Every chunk re-reads and re-writes the accumulated
# grad_W (V x H: 1.1 GB for Qwen-7B's head) in its addmm, so fewer, larger chunks cut that traffic; the chunk is
# still ~1/4 of the full logits, and peak memory stays far below eager's (docs/method.md §6: <= 1/8).
CHUNK_BYTES = 1 << 30


# ---- the chunk loops
def chunk_rows(N: int, V: int, dtype: torch.dtype, chunk_size: int | None) -> int:
    if chunk_size:
        return max(1, int(chunk_size))
    per_row = V * torch.empty((), dtype=dtype).element_size()
    rows = max(1, CHUNK_BYTES // max(per_row, 1))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps the matmul tiles whole
    return max(1, min(rows, N))


def sequence_chunk_rows(N: int, T: int, V: int, dtype: torch.dtype, chunk_size: int | None) -> int:
    """Rows per chunk holding whole sequences of T tokens (0 when one sequence exceeds the chunk budget)."""
    return chunk_rows(N, V, dtype, chunk_size) // T * T if T > 0 else 0


def _chunks(hidden, weight, bias, rows_per_chunk):
    """(s, e, hidden[s:e], its logits (e - s, V)) for each chunk of rows. The caller deletes the logits before the
    next step, so that one chunk buffer is alive at a time."""
    N = hidden.shape[0]
    for s in range(0, N, rows_per_chunk):
        e = min(N, s + rows_per_chunk)
        h = hidden[s:e]
        yield s, e, h, torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def _acc(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class _Grads:
    """grad_hidden (N, H), grad_weight (V, H) (accumulated over the chunks in the weight's dtype, as Liger does: an
    fp32 copy would cost V * H * 4 bytes) and grad_bias (V,) of a chunked loop."""

    def __init__(self, hidden, weight, bias):
        self.h = torch.empty_like(hidden)
        self.weight = weight
        self.w = None  # the first chunk writes it (no zero fill of a (V, H) buffer, no read-modify-write)
        self.b = None if bias is None else torch.zeros(weight.shape[0], device=hidden.device, dtype=_acc(hidden))
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, dz, h, weight, s, e):
        """dz (n, V) = d loss / d logits of hidden rows s:e (h): grad_hidden[s:e] = dz @ W, grad_W += dz.T @ h."""
        torch.mm(dz, weight, out=self.h[s:e])
        if self.w is None:
            self.w = torch.mm(dz.t(), h)
        else:
            self.w.addmm_(dz.t(), h)
        if self.b is not None:
            self.b += dz.sum(0, dtype=self.b.dtype)

    def result(self):
        w = torch.zeros_like(self.weight) if self.w is None else self.w
        return self.h, w, self.h.new_empty(0) if self.b is None else self.b.to(self.bias_dtype)


def _rows_of(t, s, e):
    return None if t is None else t[s:e].view(1, -1)


def _logprob_rows(rows, z, labels, *, temperature, ignore_index):
    """logp, entropy (n,) of the logits chunk z (n, V), which is left unchanged."""
    z3 = z.unsqueeze(0)
    _, logp, entropy = rows(
        z3,
        z3,
        labels.view(1, -1),
        None,
        z.new_zeros(1, z.shape[0], dtype=_acc(z)),
        None,
        None,
        temperature=temperature,
        ignore_index=ignore_index,
        coef_given=True,
        write_grad=False,
    )
    return logp.view(-1), entropy.view(-1)


def _grad_from_coef(rows, z, labels, coef, *, temperature, ignore_index):
    """Overwrites the logits chunk z (n, V) with coef (onehot - p) / T (coef (n,) = dL/dlogp)."""
    z3 = z.unsqueeze(0)
    rows(
        z3,
        z3,
        labels.view(1, -1),
        None,
        coef.view(1, -1),
        None,
        None,
        temperature=temperature,
        ignore_index=ignore_index,
        coef_given=True,
        write_grad=True,
    )


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def policy_loss_forward(
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
    *,
    use_triton,
):
    """credit::fused_linear_policy_loss_fwd[_triton], a token-level loss: hidden (N, H), weight (V, H), bias (V,) or
    None, per-token (N,) tensors (stats dtype) -> loss (), logprobs (N,), entropy (N,), grad_hidden (N, H),
    grad_weight (V, H), grad_bias (V,); the gradients are (0,)-shaped when not compute_grad (and grad_bias when bias
    is None)."""
    hidden, weight, bias, labels, advantages, weights, old_logprobs, ref_logprobs = _contiguous(
        hidden, weight, bias, labels, advantages, weights, old_logprobs, ref_logprobs
    )
    N, V = hidden.shape[0], weight.shape[0]
    rows = functools.partial(rows_forward, use_triton=use_triton)
    acc = _acc(hidden)
    logp = torch.empty(N, device=hidden.device, dtype=acc)
    entropy = torch.empty_like(logp)
    loss = logp.new_zeros(())
    grads = _Grads(hidden, weight, bias) if compute_grad else None
    for s, e, h, z in _chunks(hidden, weight, bias, chunk_rows(N, V, hidden.dtype, chunk_size)):
        z3 = z.unsqueeze(0)  # (1, n, V): becomes d loss / d logits in place
        loss_c, lp, ent = rows(
            z3,
            z3,
            labels[s:e].view(1, -1),
            _rows_of(advantages, s, e),
            _rows_of(weights, s, e),
            _rows_of(old_logprobs, s, e),
            _rows_of(ref_logprobs, s, e),
            temperature=temperature,
            ignore_index=ignore_index,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            beta=beta,
            kl_type=kl_type,
            write_grad=compute_grad,
        )
        loss += loss_c
        logp[s:e] = lp.view(-1)
        entropy[s:e] = ent.view(-1)
        if compute_grad:
            grads.add(z, h, weight, s, e)
        del z, z3  # free this chunk's buffer before the next one is allocated
    none = [hidden.new_empty(0) for _ in range(3)]  # three tensors: a custom op's outputs may not alias
    return (loss, logp, entropy, *(grads.result() if compute_grad else none))


def logprobs_forward(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, *, use_triton):
    """credit::fused_linear_logprobs_fwd[_triton]: hidden (N, H), weight (V, H), labels (N,) -> logprobs (N,),
    entropy (N,) in fp32 (fp64 for fp64 input)."""
    hidden, weight, bias, labels = _contiguous(hidden, weight, bias, labels)
    N, V = hidden.shape[0], weight.shape[0]
    rows = functools.partial(rows_forward, use_triton=use_triton)
    logp = torch.empty(N, device=hidden.device, dtype=_acc(hidden))
    entropy = torch.empty_like(logp)
    for s, e, _, z in _chunks(hidden, weight, bias, chunk_rows(N, V, hidden.dtype, chunk_size)):
        logp[s:e], entropy[s:e] = _logprob_rows(
            rows, z, labels[s:e], temperature=temperature, ignore_index=ignore_index
        )
        del z
    return logp, entropy


def logprobs_backward(
    grad_logprobs, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, *, use_triton
):
    """credit::fused_linear_logprobs_bwd[_triton]: d (sum_i g_i logp_i) w.r.t. hidden (N, H), weight (V, H) and
    bias (V,) ((0,) when None); the logits chunks are recomputed and overwritten by g (onehot - p) / T."""
    hidden, weight, bias, labels = _contiguous(hidden, weight, bias, labels)
    N, V = hidden.shape[0], weight.shape[0]
    rows = functools.partial(rows_forward, use_triton=use_triton)
    g = grad_logprobs.to(_acc(hidden)).contiguous()
    grads = _Grads(hidden, weight, bias)
    for s, e, h, z in _chunks(hidden, weight, bias, chunk_rows(N, V, hidden.dtype, chunk_size)):
        _grad_from_coef(rows, z, labels[s:e], g[s:e], temperature=temperature, ignore_index=ignore_index)
        grads.add(z, h, weight, s, e)
        del z
    return grads.result()


def sequence_loss_forward(
    hidden, weight, bias, labels, coef_of, *, seq_len, chunk, temperature, ignore_index, use_triton
):
    """Sequence-level losses (the GSPO family) in three matmuls: a token's dL/dlogp depends on its whole sequence
    and on no other, so chunks of whole sequences (``chunk`` rows, a multiple of ``seq_len``) get their logits, the
    log-probs, then the coefficients coef_of(s, e, logp[s:e]) -> (e - s,), the gradient in place and the two
    gradient matmuls, without recomputing the logits in a backward.
    hidden (N, H), labels (N,) -> logp (N,), entropy (N,), grad_hidden, grad_weight, grad_bias ((0,) without bias)."""
    rows = functools.partial(rows_forward, use_triton=use_triton)
    acc = _acc(hidden)
    logp = torch.empty(hidden.shape[0], device=hidden.device, dtype=acc)
    entropy = torch.empty_like(logp)
    grads = _Grads(hidden, weight, bias)
    if chunk <= 0 or chunk % seq_len:
        raise ValueError(f"chunk ({chunk}) must be a positive multiple of seq_len ({seq_len})")
    for s, e, h, z in _chunks(hidden, weight, bias, chunk):
        logp[s:e], entropy[s:e] = _logprob_rows(
            rows, z, labels[s:e], temperature=temperature, ignore_index=ignore_index
        )
        coef = coef_of(s, e, logp[s:e]).to(acc).contiguous()
        _grad_from_coef(rows, z, labels[s:e], coef, temperature=temperature, ignore_index=ignore_index)
        grads.add(z, h, weight, s, e)
        del z
    return (logp, entropy, *grads.result())


# ---- the GSPO family in three matmuls
class _FusedSequenceLoss(torch.autograd.Function):
    """The GSPO family through the fused LM head in three matmuls (sequence_loss_forward): gradients computed in the
    forward, chunk by chunk of whole sequences; the backward only scales them. Returns the loss and the (detached)
    statistics' values."""

    @staticmethod
    def forward(ctx, h, weight, bias, run):
        loss, stats, gh, gw, gb = run()
        ctx.has_bias = bias is not None
        ctx.save_for_backward(gh, gw, gb)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*stats)
        return loss, *stats

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        from credit_ops._autograd import head_grads

        return *head_grads(ctx, grad_loss), None


def _fused_sequence_loss(h, weight, bias, inputs, options, chunk, use_triton):
    """(loss, stats) of a GSPO-family loss, the loss differentiable w.r.t. h, weight, bias."""
    B, T = inputs.labels.shape
    # d loss / d logp of a chunk's sequences from the (B, T) scalar graph: the other sequences' log-probs do not
    # enter it (every aggregation is a sum over sequences with denominators from the mask alone), so they hold a
    # finite stand-in (the old log-probs: ratio 1) until their chunk comes.
    stand_in = (inputs.old if inputs.old is not None else torch.zeros_like(inputs.valid)).detach().clone()

    def coef_of(s, e, lp):
        stand_in.view(-1)[s:e] = lp
        with torch.enable_grad():
            leaf = stand_in.clone().requires_grad_(True)
            loss, _ = loss_from_logprobs(leaf, None, inputs, options)
            (coef,) = torch.autograd.grad(loss, leaf)
        return coef.view(-1)[s:e]

    def run():
        hidden, w, b, labels = _contiguous(h, weight, bias, inputs.labels.reshape(-1))
        logp, entropy, gh, gw, gb = sequence_loss_forward(
            hidden,
            w,
            b,
            labels,
            coef_of,
            seq_len=T,
            chunk=chunk,
            temperature=options.temperature,
            ignore_index=options.ignore_index,
            use_triton=use_triton,
        )
        loss, stats = loss_from_logprobs(logp.view(B, T), entropy.view(B, T), inputs, options)
        return loss, tuple(stats[k] for k in reference.STAT_NAMES), gh, gw, gb

    loss, *values = _FusedSequenceLoss.apply(h, weight, bias, run)
    return loss, dict(zip(reference.STAT_NAMES, values, strict=True))


# ---- the public functions
def _op(name: str, use_triton: bool):
    return getattr(torch.ops.credit, f"{name}_triton" if use_triton else name)


def _head_args(hidden, weight, labels, bias):
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, dim=2)
    _checks.tensor("hidden", hidden, dtypes=(weight.dtype,), min_dim=2)
    _checks.check(
        hidden.shape[-1] == weight.shape[1],
        lambda: (
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]}): "
            "weight is the LM head's (V, H) matrix"
        ),
    )
    _checks.check(weight.shape[0] > 0, "weight must have a non-empty vocabulary dimension")
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=(weight.dtype,))
        _checks.shape("bias", bias, (weight.shape[0],), "(V,)")
    _checks.tensor("labels", labels, dtypes=_checks.INDEX_DTYPES)
    rows_ok = hidden.shape[:-1].numel() == labels.numel() and (hidden.dim() == 2 or hidden.shape[:-1] == labels.shape)
    _checks.check(
        rows_ok,
        lambda: (
            f"hidden {tuple(hidden.shape)} must hold one row per label {tuple(labels.shape)}: (N, H) or "
            "labels.shape + (H,)"
        ),
    )
    _checks.same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    return hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])


def _lm_head_autocast(fn):
    """Under torch.autocast the LM head's operands go to the autocast dtype (what nn.Linear would compute in) and
    the op runs with autocast off: its chunked matmuls write into buffers of the operands' dtype. Gradients reach
    the original (e.g. fp32 master) tensors through the casts."""

    @functools.wraps(fn)
    def wrapper(hidden, weight, labels, *args, bias=None, **kwargs):
        if not torch._C._is_any_autocast_enabled():  # one C call (as torch.nn.RNN asks): the common case
            return fn(hidden, weight, labels, *args, bias=bias, **kwargs)
        device = hidden.device.type if isinstance(hidden, Tensor) else "cpu"
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):  # meta: none
            return fn(hidden, weight, labels, *args, bias=bias, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)
        with torch.autocast(device, enabled=False):
            return fn(cast(hidden), cast(weight), labels, *args, bias=cast(bias), **kwargs)

    return wrapper


@_lm_head_autocast
def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    select: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """token_logprobs of the LM head's logits, hidden @ weight.T + bias, without materialising them.

    For the old-policy and reference passes (under ``torch.no_grad()`` it keeps one (chunk, V) logits buffer);
    differentiable w.r.t. hidden, weight and bias through the log-probs (the backward recomputes each chunk; the
    entropy is returned detached). ``chunk_size`` tokens per chunk (default: ~1 GiB of logits per chunk).
    ``select`` (bool, labels' shape) computes only the selected tokens (gathered once: one host synchronisation),
    e.g. the active tokens of ``fused_linear_policy_loss(active_only=True)``; the others get 0.

    Shapes:
        hidden: (N, H) or labels.shape + (H,), same dtype as weight; weight: (V, H); bias: (V,) or None
        labels: (N,) or any shape with N elements, int32 / int64 in [0, V) or ``ignore_index``
        select: labels.shape bool, or None (every token)
        returns: logprobs of labels.shape, float32 (float64 for float64 input); with return_entropy also entropy
    """
    h = _head_args(hidden, weight, labels, bias)
    _checks.check(temperature > 0, lambda: f"temperature must be > 0, got {temperature}")
    _checks.ids_in_range("labels", labels, weight.shape[0], ignore_index=ignore_index)
    if select is not None:
        _checks.tensor("select", select, dtypes=(torch.bool,))
        _checks.shape("select", select, labels.shape, "(that of labels)")
        _checks.same_device(select=select, labels=labels)
        index = select.reshape(-1).nonzero().squeeze(1)
        logp, entropy = fused_linear_logprobs(
            h.index_select(0, index),
            weight,
            labels.reshape(-1).index_select(0, index),
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=True,
            chunk_size=chunk_size,
        )
        scatter = lambda t: t.new_zeros(labels.numel()).index_copy(0, index, t).view(labels.shape)
        return (scatter(logp), scatter(entropy)) if return_entropy else scatter(logp)
    backend = resolve(hidden.device, triton=True)
    if backend == "reference":
        out = reference.fused_linear_logprobs(
            h,
            weight,
            labels.reshape(-1),
            bias=bias,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=True,
        )
    else:
        op = _op("fused_linear_logprobs_fwd", backend == "triton")
        flat = labels if labels.dim() == 1 else labels.reshape(-1)
        out = op(h, weight, bias, flat, float(temperature), int(ignore_index), int(chunk_size or 0))
    logp = out[0] if labels.dim() == 1 else out[0].view(labels.shape)  # (a view costs ~3 us a call)
    if not return_entropy:
        return logp
    entropy = out[1].detach()
    return logp, entropy if labels.dim() == 1 else entropy.view(labels.shape)


@_lm_head_autocast
def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    advantages: Tensor,
    *,
    bias: Tensor | None = None,
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
    chunk_size: int | None = None,
    active_only: bool = False,
    whole_batch_entropy: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """credit_ops.policy_loss of the LM head's logits hidden @ weight.T + bias, never materialising them.

    Same semantics and options as :func:`credit_ops.policy_loss` (hidden row t scores labels[..., t]), gates and
    weights included. Token-level loss types compute, per chunk of tokens, the logits (one matmul), the loss and
    d loss / d logits in place (one fused row kernel) and the gradient matmuls, all in the forward: three matmuls in
    total, one (chunk, V) buffer, and the backward only scales the stored gradients.

    ``active_only=True`` (token-level types) leaves the tokens that carry neither loss nor gradient out of all three
    matmuls: those whose aggregation weight x gate x weight is 0, and, with beta = 0, those whose advantage is 0
    (outside the edits of repaired samples, IOP's dropped correct samples, groups with equal rewards; the rule is
    policy_loss.active_tokens). The active rows are gathered once (one host synchronisation, for their count); loss
    and gradients are the dense ones up to summation order, and the statistics cover the active tokens only
    (``num_tokens`` counts them). ``whole_batch_entropy=True`` also runs the other valid tokens through the logits
    matmul alone (no gradient matmuls; a second synchronisation), so that entropy_mean is over every valid token as
    in the dense computation: at an active fraction f that costs f + (1 - f) / 3 of the dense matmuls instead of f.
    Leave active_only off for whole-batch clip fractions, ratio and KL. The GSPO family needs a whole sequence's
    log-probs before any of its gradients: chunks of whole sequences get the logits, the log-probs, the sequences'
    d loss / d logp from the scalar graph, then the gradient (three matmuls, in the forward); when one sequence
    exceeds a chunk, or under torch.compile or no_grad, a log-prob pass now and a backward that recomputes the logits
    (four matmuls).
    bf16 operands with fp32 accumulation; lse, loss and statistics in fp32. grad_weight is accumulated over the
    chunks in the weight's dtype.

    Shapes:
        hidden: (B, T, H) or (N = B T, H); weight: (V, H); bias: (V,) or None
        labels: (B, T), or (N,) for a single sequence; the per-token tensors of policy_loss with labels' shape
        advantages: (B,) or (B, T) ((1,) or (N,) with 1-D labels)
        returns: loss (), stats (see policy_loss)
    """
    h = _head_args(hidden, weight, labels, bias)
    if labels.dim() == 1:  # a single packed sequence
        labels = labels.unsqueeze(0)
        unsq = lambda t: None if t is None else t.reshape(1, -1)
        advantages = advantages.reshape(1) if advantages.numel() == 1 else unsq(advantages)
        old_logprobs, ref_logprobs, mask, gates, weights = map(unsq, (old_logprobs, ref_logprobs, mask, gates, weights))
    V = weight.shape[0]
    # A token-level loss on CPU tensors (eager): one C++ call does it all, the chunk loop included.
    one_call = (
        _policy_loss.ONE_CALL
        and loss_type in reference.TOKEN_LOSSES
        and not (active_only and whole_batch_entropy)
        and native_bookkeeping(hidden)
    )
    options, inputs = prepare(
        labels,
        V,
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
        acc=_acc(hidden),
        flat=loss_type not in reference.SEQUENCE_LOSSES,  # the token-level kernels take rows (N,)
        build=not one_call,
    )
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if one_call:
        out = torch.ops.credit.fused_linear_policy_loss_cpu(
            h, weight, bias, labels, advantages, old_logprobs, ref_logprobs, mask, gates, weights,
            options.temperature, options.ignore_index, options.eps_low, options.eps_high,
            float(options.dual_clip or 0.0), options.beta, KL_IDS[options.kl_type], AGG_IDS[options.agg],
            options.max_length or 0, options.empty_rows == "skip", active_only,
            chunk_rows(h.shape[0], V, h.dtype, chunk_size), needs_grad,
        )  # fmt: skip
        return out[0], dict(zip(reference.STAT_NAMES, out[1:8], strict=True))
    backend = resolve(hidden.device, triton=True)
    if backend == "reference":
        return reference.fused_linear_policy_loss(
            h,
            weight,
            labels,
            advantages,
            bias=bias,
            mask=mask,
            temperature=temperature,
            ignore_index=ignore_index,
            **reference_options(options, old_logprobs, ref_logprobs, gates, weights),
        )
    use_triton = backend == "triton"
    if loss_type in reference.SEQUENCE_LOSSES:
        chunk = sequence_chunk_rows(h.shape[0], labels.shape[1], V, h.dtype, chunk_size)
        if needs_grad and chunk > 0 and not torch.compiler.is_compiling():
            return _fused_sequence_loss(h, weight, bias, inputs, options, chunk, use_triton)
        # No gradient wanted, traced, or a sequence longer than a chunk: log-probs now, the gradient in a backward
        # that recomputes the logits (four matmuls).
        logp, entropy = _op("fused_linear_logprobs_fwd", use_triton)(
            h, weight, bias, inputs.labels.reshape(-1), options.temperature, options.ignore_index, int(chunk_size or 0)
        )
        return loss_from_logprobs(logp.view(labels.shape), entropy.view(labels.shape), inputs, options)
    # The token-level kernels take rows: prepare gave contiguous (N,) tensors.
    w = inputs.w
    rows = (h.contiguous(), inputs.labels, inputs.valid, inputs.adv, w, inputs.old, inputs.ref)
    inactive_entropy = None
    if active_only:
        carries = active_tokens(w, inputs.adv, options.beta)
        index = carries.nonzero().squeeze(1)
        if index.numel() < carries.numel():
            rows = tuple(None if t is None else t.index_select(0, index) for t in rows)
        if whole_batch_entropy:
            left = ((inputs.valid > 0) & ~carries).nonzero().squeeze(1)
            _, ent = _op("fused_linear_logprobs_fwd", use_triton)(
                h.detach().index_select(0, left),
                weight.detach(),
                None if bias is None else bias.detach(),
                inputs.labels.index_select(0, left),
                options.temperature,
                options.ignore_index,
                int(chunk_size or 0),
            )
            inactive_entropy = (ent.sum(), ent.new_tensor(float(left.numel())))
    hh, lab, valid, adv, ww, old, ref = rows
    loss, logp, entropy, _, _, _ = _op("fused_linear_policy_loss_fwd", use_triton)(
        hh, weight, bias, lab, adv, ww, old, ref, *options.kernel_params().values(), int(chunk_size or 0), needs_grad
    )
    # The statistics' tokens: every row, or the active rows gathered above
    scored = TokenInputs(lab, valid, adv, old, ref, None, None) if active_only else inputs
    if active_only:
        return loss, active_stats(logp, entropy, scored, options, inactive_entropy)
    return loss, loss_stats(None, logp, entropy, scored, options)


# The CPU kernels of the credit::fused_linear_* ops (their schemas are in csrc/registration.cpp): the chunk loops
# above around the C++ row kernel. The Triton ops in _triton_ops.py run the same loops around the Triton one.
@torch.library.register_kernel("credit::fused_linear_policy_loss_fwd", "cpu")
def _policy_loss_cpu(*args):
    return policy_loss_forward(*args, use_triton=False)


@torch.library.register_kernel("credit::fused_linear_logprobs_fwd", "cpu")
def _logprobs_cpu(*args):
    return logprobs_forward(*args, use_triton=False)


@torch.library.register_kernel("credit::fused_linear_logprobs_bwd", "cpu")
def _logprobs_backward_cpu(*args):
    return logprobs_backward(*args, use_triton=False)
