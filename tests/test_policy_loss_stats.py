"""The statistics policy_loss and fused_linear_policy_loss return (clip_frac_low, clip_frac_high, clip_frac,
ratio_mean, kl_mean, entropy_mean, num_tokens) against TRL's definitions computed here (not credit_ops.reference),
hand-computed cases that pin those definitions, and gated_gspo's gates: a token with gate 0 cannot change the loss.

TRL's statistics (GRPOTrainer._compute_loss), means over the valid tokens (labels != ignore_index and mask):
    clip_frac_low   ratio < 1 - eps_low  where A < 0  (the clip that bites for a negative advantage)
    clip_frac_high  ratio > 1 + eps_high where A > 0
    clip_frac       either of the two
    ratio_mean      the importance ratio (the sequence's ratio on each of its tokens for the GSPO family)
    kl_mean         per-token KL(pi || pi_ref) estimate of kl_type from d = ref - logp (0 without ref_logprobs):
                    k1 -d, k2 d^2 / 2, k3 exp(d) - d - 1
    entropy_mean    entropy of softmax(logits / temperature)
    num_tokens      the number of valid tokens
"""

import math

import pytest
import torch

import credit_ops
from credit_ops import reference as R
from tests.conftest import backend_devices

STATS = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "kl_mean", "entropy_mean", "num_tokens")
# Every backend the policy-loss tests run (native on CUDA is the Triton kernels, run as "triton"), and the reference:
# it is checked here against formulas of its own.
BACKENDS = [(b, d) for b, d in backend_devices() if (b, d) != ("native", "cuda")]
EPS = {t: (0.2, 0.28) for t in R.TOKEN_LOSSES} | {t: (3e-4, 4e-4) for t in R.SEQUENCE_LOSSES}  # TRL / GSPO


def tol(backend, device):
    """float64 inputs; Triton passes float scalars as fp32 (see test_policy_loss.tol64)."""
    return 1e-9 if backend != "triton" else 1e-7 if device == "cpu" else 1e-5


# ---- the statistics, written from the definitions above
def trl_stats(
    logits,
    labels,
    adv,
    *,
    old_logprobs=None,
    ref_logprobs=None,
    mask=None,
    gates=None,
    loss_type,
    eps_low=None,
    eps_high=None,
    kl_type="k3",
    temperature=1.0,
    ignore_index=-100,
    **_loss_options,
):
    """The statistics of float64 logits (B, T, V), one sequence at a time: Python loops over tokens. eps default
    to TRL's (token ratios) and GSPO's (sequence ratios); the options that shape only the loss are ignored."""
    eps_low = EPS[loss_type][0] if eps_low is None else eps_low
    eps_high = EPS[loss_type][1] if eps_high is None else eps_high
    logits, labels, adv = logits.detach().cpu().double(), labels.cpu(), adv.cpu().double()
    B, T, _ = logits.shape
    z = logits / temperature
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    rows = []  # (ratio, advantage, kl, entropy) of each valid token
    for b in range(B):
        toks = [t for t in range(T) if labels[b, t] != ignore_index and (mask is None or bool(mask[b, t]))]
        logp = {t: logp_all[b, t, labels[b, t]].item() for t in toks}
        # on-policy (no old log-probs): the old policy is the current one, every log-ratio 0
        log_ratio = {t: 0.0 if old_logprobs is None else logp[t] - old_logprobs[b, t].item() for t in toks}
        if loss_type in R.SEQUENCE_LOSSES:  # one ratio per sequence: exp of the (gate-)weighted mean log-ratio
            w = {t: 1.0 if gates is None or loss_type != "gated_gspo" else gates[b, t].item() for t in toks}
            total = sum(w.values())
            seq = math.exp(sum(w[t] * log_ratio[t] for t in toks) / total) if total > 0 else 1.0
        for t in toks:
            ratio = seq if loss_type in R.SEQUENCE_LOSSES else math.exp(log_ratio[t])
            a = adv[b].item() if adv.dim() == 1 else adv[b, t].item()
            kl = 0.0
            if ref_logprobs is not None:
                d = ref_logprobs[b, t].item() - logp[t]
                kl = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1.0}[kl_type]
            p = logp_all[b, t].exp()
            entropy = -(p * logp_all[b, t]).sum().item()
            rows.append((ratio, a, kl, entropy))
    n = len(rows)
    mean = lambda xs: sum(xs) / n if n else 0.0
    low = [r < 1 - eps_low and a < 0 for r, a, _, _ in rows]
    high = [r > 1 + eps_high and a > 0 for r, a, _, _ in rows]
    return dict(
        clip_frac_low=mean(low),
        clip_frac_high=mean(high),
        clip_frac=mean([x or y for x, y in zip(low, high, strict=True)]),
        ratio_mean=mean([r for r, _, _, _ in rows]),
        kl_mean=mean([k for _, _, k, _ in rows]),
        entropy_mean=mean([e for _, _, _, e in rows]),
        num_tokens=float(n),
    )


def check_stats(stats, want, tolerance):
    assert set(STATS) <= set(stats)
    for k in STATS:
        assert stats[k].dim() == 0 and not stats[k].requires_grad, k
        got = stats[k].item()
        assert got == pytest.approx(want[k], rel=tolerance, abs=tolerance), f"{k}: {got} != {want[k]}"


# ---- the entry points: the logits path (plain, in place, the model's full output, no grad), the fused LM head,
# and the loss from log-probs (given the entropy)
LOGITS_ENTRIES = ("logits", "inplace_grad", "full_model_output", "no_grad")
HEAD_ENTRIES = ("fused_head", "fused_head-chunks_cut_sequences", "fused_head-no_grad")
ENTRIES = LOGITS_ENTRIES + HEAD_ENTRIES + ("from_logprobs",)


def cases(entries):
    """(entry, backend, device) for each entry on each backend; the loss from log-probs has no Triton kernels (the
    triton backend runs the native code), so it runs once on the native backend."""
    return [
        pytest.param(e, b, d, id=f"{e}-{b}-{d}")
        for e in entries
        for b, d in BACKENDS
        if not (e == "from_logprobs" and b == "triton")
    ]


def head_of(logits, H=8):
    """(hidden, weight, bias) with hidden @ weight.T + bias == logits exactly: the logits in hidden's first V
    columns, fixed random ones after them, weight = [I 0], bias 0."""
    B, T, V = logits.shape
    extra = torch.randn(B, T, H, dtype=logits.dtype, generator=torch.Generator().manual_seed(0))
    hidden = torch.cat([logits, extra], -1)
    weight = torch.cat([torch.eye(V, dtype=logits.dtype), torch.zeros(V, H, dtype=logits.dtype)], -1)
    bias = torch.zeros(V, dtype=logits.dtype)
    return hidden, weight, bias


def call(entry, backend, device, logits, labels, adv, **kw):
    """(loss, stats) of one entry point; every tensor moved to device."""
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    labels, adv, kw = to(labels), to(adv), {k: to(v) for k, v in kw.items()}
    with credit_ops.use_backend(backend):
        if entry in LOGITS_ENTRIES:
            x = logits.detach().clone().to(device)
            if entry == "full_model_output":
                x = torch.cat([x, torch.randn_like(x[:, :1])], 1)
            leaf = x.requires_grad_(entry != "no_grad")
            with torch.set_grad_enabled(entry != "no_grad"):
                inp = leaf * 1.0 if entry == "inplace_grad" else leaf
                loss, stats = credit_ops.policy_loss(inp, labels, adv, inplace_grad=entry == "inplace_grad", **kw)
            if entry != "no_grad":
                loss.backward()
            return loss, stats
        if entry == "from_logprobs":
            z = logits.detach().cpu().double() / kw.pop("temperature", 1.0)
            logp_all = torch.log_softmax(z, -1)
            logp = logp_all.gather(-1, labels.cpu().clamp(min=0).unsqueeze(-1)).squeeze(-1).to(device)
            entropy = -(logp_all.exp() * logp_all).sum(-1).to(device)
            valid = labels != -100
            if kw.get("mask") is not None:
                valid = valid & kw.pop("mask")
            x = logp.requires_grad_(True)
            loss, stats = credit_ops.policy_loss_from_logprobs(x, adv, mask=valid, entropy=entropy, **kw)
            loss.backward()
            return loss, stats
        hidden, weight, bias = (t.to(device) for t in head_of(logits.detach().cpu()))
        grad = entry != "fused_head-no_grad"
        chunk = 4 if entry == "fused_head-chunks_cut_sequences" else None  # T = 6: a chunk cuts a sequence
        with torch.set_grad_enabled(grad):
            leaves = [t.requires_grad_(grad) for t in (hidden, weight, bias)]
            loss, stats = credit_ops.fused_linear_policy_loss(
                leaves[0], leaves[1], labels, adv, bias=leaves[2], chunk_size=chunk, **kw
            )
        if grad:
            loss.backward()
        return loss, stats


def sample(B=3, T=6, V=29, *, old=True, ref=True, mask=True, gates=True, per_token=True, ignore=True, all_masked=False):
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T))
    if ignore:
        labels[0, -2:] = -100
    cur = (logits - torch.logsumexp(logits, -1, keepdim=True)).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kw = {}
    if old:  # ratios on both sides of the token clip range; sequence ratios away from 1
        kw["old_logprobs"] = cur + 0.4 * torch.randn(B, T, dtype=torch.float64)
    if ref:
        kw["ref_logprobs"] = cur + 0.5 * torch.randn(B, T, dtype=torch.float64)
    if mask:
        m = torch.rand(B, T) > 0.25
        m[1, :3] = False
        kw["mask"] = m & (not all_masked)
    if gates:
        g = torch.rand(B, T, dtype=torch.float64)
        g[g < 0.3] = 0.0
        kw["gates"] = g
    adv = torch.randn(B, T, dtype=torch.float64) if per_token else torch.randn(B, dtype=torch.float64)
    return logits, labels, adv, kw


@pytest.mark.parametrize("entry,backend,device", cases(ENTRIES))
@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
def test_stats_match_trl_definitions(backend, device, loss_type, entry):
    """Off-policy, gates, a mask, ignored labels, per-token advantages, k3 KL, a dual clip, the default eps: every
    loss type through every entry point."""
    logits, labels, adv, kw = sample()
    kw.update(loss_type=loss_type, beta=0.05, dual_clip=3.0, max_length=8)
    _, stats = call(entry, backend, device, logits, labels, adv, **kw)
    check_stats(stats, trl_stats(logits, labels, adv, **kw), tol(backend, device))


OPTIONS = [
    pytest.param(
        dict(kl_type="k1", temperature=0.7, eps_low=0.1, eps_high=0.3),
        dict(per_token=False, gates=False),
        id="k1-temperature-eps-per_seq-no_gates",
    ),
    pytest.param(
        dict(kl_type="k2", eps_low=0.05, eps_high=0.05), dict(old=False, mask=False), id="k2-on_policy-no_mask"
    ),
    pytest.param(dict(beta=0.0), dict(ref=False, ignore=False), id="no_ref-nothing_ignored"),
    pytest.param(dict(), dict(all_masked=True), id="no_valid_token"),
]


@pytest.mark.parametrize("entry,backend,device", cases(["logits", "fused_head", "from_logprobs"]))
@pytest.mark.parametrize("options,inputs", OPTIONS)
@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
def test_stats_options(backend, device, loss_type, options, inputs, entry):
    """KL types, temperature (the entropy's too), explicit eps, per-sequence advantages, on-policy (ratio 1), no
    reference policy (KL 0), no valid token at all (every statistic 0)."""
    logits, labels, adv, kw = sample(**inputs)
    kw.update(loss_type=loss_type, **{"beta": 0.05, "max_length": 8, **options})
    _, stats = call(entry, backend, device, logits, labels, adv, **kw)
    want = trl_stats(logits, labels, adv, **kw)
    if inputs.get("all_masked"):
        assert want == dict.fromkeys(STATS, 0.0)
    check_stats(stats, want, tol(backend, device))


# ---- hand-computed 2 x 3 cases: uniform logits over V = 4 (log-prob -ln 4, entropy ln 4 on every token), the
# old log-probs set for chosen ratios r (old = logp - ln r), the reference's for chosen d = ref - logp.
LN2, LN4 = math.log(2), math.log(4)


def hand_inputs(ratios, adv, d, gates, excluded_by):
    """Token (1, 2) is excluded, by the mask or by an ignored label: it would count otherwise."""
    labels = torch.tensor([[0, 1, 2], [3, 0, 1]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    if excluded_by == "mask":
        mask[1, 2] = False
    else:
        labels[1, 2] = -100
    kw = dict(
        old_logprobs=-LN4 - torch.tensor(ratios, dtype=torch.float64).log(),
        ref_logprobs=-LN4 + torch.tensor(d, dtype=torch.float64),
        mask=mask,
        gates=torch.tensor(gates, dtype=torch.float64),
    )
    return torch.zeros(2, 3, 4, dtype=torch.float64), labels, torch.tensor(adv, dtype=torch.float64), kw


# d: ln 2 on three valid tokens, 0 on one, -ln 2 on one (and ln 2 on the excluded token)
D = [[LN2, LN2, 0.0], [-LN2, LN2, LN2]]
KL = {"k1": -2 * LN2 / 5, "k2": 0.5 * 4 * LN2**2 / 5, "k3": (3 * (1 - LN2) + (LN2 - 0.5)) / 5}
# Token ratios (eps 0.2 / 0.28): low clips where r < 0.8 and A < 0 (only (0, 0): (0, 1) has A > 0); high clips
# where r > 1.28 and A > 0 (only (0, 2): (1, 0) has A < 0, (1, 1) lies inside).
TOKEN_CASE = dict(
    ratios=[[0.5, 0.7, 1.5], [1.4, 1.25, 0.5]],
    adv=[[-1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]],
    d=D,
    gates=[[1.0, 0.5, 1.0], [0.0, 1.0, 1.0]],
)
TOKEN_WANT = dict(clip_frac_low=1 / 5, clip_frac_high=1 / 5, clip_frac=2 / 5, ratio_mean=5.35 / 5)
# Sequence ratios (eps 3e-4 / 4e-4): gspo s_0 = (2 * 8 * 0.5)^(1/3) = 2, s_1 = (0.5 * 0.125)^(1/2) = 0.25 (the
# excluded token's ratio 4 would make it 0.63); gated_gspo weighs by the gates: s_0 = (2 * 0.5)^(1/2) = 1 (the
# gate-0 token's ratio 8 is out), s_1 = 0.25 (equal gates 0.5, 0.5: normalised by their sum).
SEQ_CASE = dict(
    ratios=[[2.0, 8.0, 0.5], [0.5, 0.125, 4.0]],
    adv=[[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]],
    d=D,
    gates=[[1.0, 0.0, 1.0], [0.5, 0.5, 1.0]],
)
SEQ_WANT = {
    # low: (1, 0) only ((1, 1) has A > 0); high: (0, 0), (0, 2) ((0, 1) has A < 0)
    "gspo": dict(clip_frac_low=1 / 5, clip_frac_high=2 / 5, clip_frac=3 / 5, ratio_mean=(3 * 2 + 2 * 0.25) / 5),
    # s_0 = 1 clips neither way
    "gated_gspo": dict(clip_frac_low=1 / 5, clip_frac_high=0.0, clip_frac=1 / 5, ratio_mean=(3 * 1 + 2 * 0.25) / 5),
}
SEQ_WANT["gspo_token"] = SEQ_WANT["gspo"]
HAND = [pytest.param(t, TOKEN_CASE, TOKEN_WANT, id=t) for t in R.TOKEN_LOSSES] + [
    pytest.param(t, SEQ_CASE, SEQ_WANT[t], id=t) for t in R.SEQUENCE_LOSSES
]


@pytest.mark.parametrize("entry,backend,device", cases(["logits", "fused_head", "from_logprobs"]))
@pytest.mark.parametrize(
    "excluded_by,kl_type",
    [("mask", "k3"), ("ignore_index", "k1"), ("mask", "k2")],
    ids=["masked-k3", "ignored-k1", "masked-k2"],
)
@pytest.mark.parametrize("loss_type,case,want", HAND)
def test_stats_hand_computed(backend, device, loss_type, case, want, excluded_by, kl_type, entry):
    logits, labels, adv, kw = hand_inputs(**case, excluded_by=excluded_by)
    _, stats = call(
        entry, backend, device, logits, labels, adv, loss_type=loss_type, kl_type=kl_type, beta=0.04, max_length=3, **kw
    )
    full = dict(want, kl_mean=KL[kl_type], entropy_mean=LN4, num_tokens=5.0)
    check_stats(stats, full, tol(backend, device))
    # the test's formulas give the hand values too
    mine = trl_stats(logits, labels, adv, loss_type=loss_type, kl_type=kl_type, **kw)
    check_stats({k: torch.tensor(v, dtype=torch.float64) for k, v in mine.items()}, full, 1e-12)


# ---- gated_gspo: a token with gate 0 takes no part in the loss
GATE_ENTRIES = [
    "reference_module",
    "from_logprobs-native-cpu",
    *[f"{e}-{b}-{d}" for e in ("logits", "inplace_grad", "fused_head") for b, d in BACKENDS if b != "reference"],
]


@pytest.mark.parametrize("case", GATE_ENTRIES)
def test_gated_gspo_gate_zero_token_changes_nothing(case):
    """Changing a gate-0 token's logits, old log-prob, reference log-prob and advantage changes neither the loss nor
    the gradient of any other token (its own stays 0): the sequence ratio weighs log-ratios by gates x mask, not by
    the mask, and the KL term is gated too. Loose eps: the ratios stay inside the clip range, where the loss depends
    on them."""
    logits, labels, adv, kw = sample(B=4, T=7, V=23)
    valid = (labels != -100) & kw["mask"]
    zero = valid & (kw["gates"] == 0)
    assert zero.any() and (valid & (kw["gates"] > 0)).sum(1).min() > 0
    opts = dict(loss_type="gated_gspo", eps_low=0.5, eps_high=0.5, beta=0.1)

    def loss_and_grads(logits, old, ref, adv):
        args = dict(kw, old_logprobs=old, ref_logprobs=ref, **opts)
        if case == "reference_module":
            x = logits.clone().requires_grad_(True)
            loss, _ = R.policy_loss(x, labels, adv, **args)
            return loss, torch.autograd.grad(loss, x)[0], None
        entry, backend, device = case.rsplit("-", 2)
        to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
        args = {k: to(v) for k, v in args.items()}
        with credit_ops.use_backend(backend):
            if entry == "from_logprobs":  # log-probs of the logits, differentiated through to them
                x = logits.clone().requires_grad_(True)
                logp = torch.log_softmax(x, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                mask = args.pop("mask") & (labels != -100)
                loss, _ = credit_ops.policy_loss_from_logprobs(logp, adv, mask=mask, **args)
                return loss, torch.autograd.grad(loss, x)[0], None
            if entry == "fused_head":
                h, w, b = (t.to(device).requires_grad_(True) for t in head_of(logits, H=3))
                loss, _ = credit_ops.fused_linear_policy_loss(h, w, labels.to(device), adv.to(device), bias=b, **args)
                gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
                return loss, gh[..., : logits.shape[-1]].cpu(), (gw.cpu(), gb.cpu())
            base = logits.clone().to(device).requires_grad_(True)
            x = base * 1.0 if entry == "inplace_grad" else base
            loss, _ = credit_ops.policy_loss(
                x, labels.to(device), adv.to(device), inplace_grad=entry == "inplace_grad", **args
            )
            return loss, torch.autograd.grad(loss, base)[0].cpu(), None

    loss, g, head = loss_and_grads(logits, kw["old_logprobs"], kw["ref_logprobs"], adv)
    z = zero.unsqueeze(-1)
    loss2, g2, head2 = loss_and_grads(
        torch.where(z, logits + 3 * torch.randn_like(logits), logits),
        torch.where(zero, kw["old_logprobs"] - 1.5 + torch.rand_like(adv), kw["old_logprobs"]),
        torch.where(zero, kw["ref_logprobs"] + 2.0, kw["ref_logprobs"]),
        torch.where(zero, -5 * adv, adv),
    )
    t = 1e-6
    assert loss.item() != 0
    assert loss2.item() == pytest.approx(loss.item(), rel=t, abs=t)
    assert (g[zero] == 0).all() and (g2[zero] == 0).all()
    torch.testing.assert_close(g2[~zero].double(), g[~zero].double(), rtol=t, atol=t)
    if head is not None:  # the LM head's weight and bias see the gate-0 rows through their zero gradient only
        for a, b in zip(head2, head, strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=t, atol=t)
