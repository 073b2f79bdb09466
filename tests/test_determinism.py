"""Batch-invariant, bitwise-reproducible log-probs (README "Backends and checks"): for the same row of logits,
token_logprobs, every kernel policy_loss runs and the fused LM head's log-prob pass give the same bits, whatever the
batch size, the padding, the row's position in the batch, the tensor layout and the head's chunk size. Per backend
and device: the C++ kernels (native-cpu), the Triton kernels in the interpreter (triton-cpu) and on a GPU
(triton-cuda, in scripts/gpu_check.sh). Bitwise means torch.equal, never allclose.
"""

import pytest
import torch

import credit_ops
from credit_ops.ops import policy_loss as pl
from tests.conftest import backend_devices

# The reference backend (torch.log_softmax) promises nothing of the kind; native on CUDA runs the Triton kernels.
BACKENDS = [(b, d) for b, d in backend_devices() if b != "reference" and (b, d) != ("native", "cuda")]
IDS = [f"{b}-{d}" for b, d in BACKENDS]
IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# A temperature per dtype, so that both T = 1 and T != 1 reach every path without doubling the cases.
TEMPERATURE = {"fp32": 1.0, "bf16": 0.7, "fp16": 1.3, "fp64": 0.9}
# One register tile (V <= 16384) and streamed rows (an odd V just past it, one past 32k); V = 1 and odd sizes. The
# streamed rows are slow in the Triton interpreter: one case runs by default, the rest with the slow tests (and
# test_streamed_rows_small_tiles reaches the streaming code on small rows).
CASES = [
    pytest.param(
        V, dtype, id=f"V{V}-{dtype}", marks=[pytest.mark.slow] if V > 16384 and (V, dtype) != (16385, "bf16") else []
    )
    for V in (1, 37, 3001, 16384, 16385, 32771)
    for dtype in ("fp32", "bf16", "fp16") + (("fp64",) if V <= 3001 else ())
]


def rows_of_interest(V, dtype, device):
    """Two rows (2, V) and their labels: one with masked (-inf) vocabulary entries, one whose largest logit sits
    near the end, far above the first tiles' (the streaming reduction moves its reference point mid-row)."""
    g = torch.Generator().manual_seed(V)
    z = torch.randn(2, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (2,), generator=g)
    if V >= 8:
        z[0, 2::5] = float("-inf")
        labels[0] = 1
        z[1, -3] = z[1].max() + 25.0
    return z.to(DTYPES[dtype]).to(device), labels.to(device)


def placements(rows, labels, every=True):
    """(logits (B, T, V), labels (B, T), {row i: its (b, t)}) for every batch the rows are placed in: alone (batches
    of 1), among 7 and among 64 rows, at the start, in the middle and at the end, with valid filler rows, padding
    rows (ignore_index; NaN logits, which must not leak) and the (B, T + 1, V)[:, :-1] slice. ``every=False`` leaves
    out two shapes that only a compiler could treat differently (T = 1 and one long row of rows: the interpreter,
    slow, specialises on nothing)."""
    n, V = rows.shape
    g = torch.Generator().manual_seed(V + 1)
    out = [(rows[i].view(1, 1, V), labels[i].view(1, 1), {i: (0, 0)}) for i in range(n)]
    batches = [
        (7, (1, 7), (3, 6), False),
        (7, (7, 1), (0, 4), False),
        (64, (8, 8), (63, 0), False),
        (64, (8, 8), (9, 50), True),
        (64, (1, 64), (31, 32), False),
    ]
    for N, shape, where, sliced in batches if every else [batches[0], batches[2], batches[3]]:
        x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(rows.dtype).to(rows.device)
        y = torch.randint(0, V, (N,), generator=g).to(labels.device)
        pad = torch.arange(N, device=labels.device) % 4 != 1  # three rows in four are padding, the others filler
        y[pad] = IGNORE
        x[pad & (torch.arange(N, device=x.device) % 2 == 0)] = float("nan")
        for i, p in enumerate(where):
            x[p], y[p] = rows[i], labels[i]
        B, T = shape
        if sliced:
            full = torch.full((B, T + 1, V), float("nan"), dtype=x.dtype, device=x.device)
            full[:, :T] = x.view(B, T, V)
            logits = full[:, :-1]
        else:
            logits = x.view(B, T, V)
        out.append((logits, y.view(B, T), {i: divmod(p, T) for i, p in enumerate(where)}))
    return out


def log_probs_of_every_path(backend, logits, labels, temperature):
    """{path: (logp (B, T), entropy (B, T))} of every kernel that reports log-probs for these logits."""
    triton = backend == "triton"
    B, T, _ = logits.shape
    dev = logits.device
    out = {}
    with credit_ops.use_backend(backend):
        out["token_logprobs"] = (credit_ops.token_logprobs(logits, labels, temperature=temperature), None)
        out["token_logprobs+entropy"] = credit_ops.token_logprobs(
            logits, labels, temperature=temperature, return_entropy=True
        )
    # policy_loss's token-level kernel (its public function returns only means of these)
    op = torch.ops.credit.policy_loss_fwd_triton if triton else torch.ops.credit.policy_loss_fwd
    adv, w = torch.randn(B, T, device=dev), torch.rand(B, T, device=dev)
    old, ref = -torch.rand(B, T, device=dev), -torch.rand(B, T, device=dev)
    _, lp, ent, _ = op(logits, labels, adv, w, old, ref, temperature, IGNORE, 0.2, 0.28, 3.0, 0.05, 3, True)
    out["policy_loss"] = (lp, ent)
    _, lp, ent, _ = op(logits, labels, adv, w, None, None, temperature, IGNORE, 0.2, 0.28, 0.0, 0.0, 0, False)
    out["policy_loss on-policy, no gradient"] = (lp, ent)
    # in place with given coefficients: inplace_grad=True, and the fused head's and the GSPO family's gradient pass
    x = logits.contiguous().clone()
    kw = dict(use_triton=triton, temperature=temperature, ignore_index=IGNORE, coef_given=True)
    _, lp, ent = pl.rows_forward(x, x, labels.contiguous(), None, w, None, None, **kw)
    out["policy_loss rows, in place"] = (lp, ent)
    return out


def check_every_placement(backend, rows, labels, temperature, batches):
    """Every path's log-prob and entropy of each row in each batch equals, bit for bit, token_logprobs' of the row
    alone."""
    V = rows.shape[1]
    want = {}
    with credit_ops.use_backend(backend):
        for i in range(rows.shape[0]):
            lp, ent = credit_ops.token_logprobs(
                rows[i].view(1, 1, V), labels[i].view(1, 1), temperature=temperature, return_entropy=True
            )
            assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
            want[i] = lp[0, 0], ent[0, 0]
    for logits, y, where in batches:
        for path, (lp, ent) in log_probs_of_every_path(backend, logits, y, temperature).items():
            for i, (b, t) in where.items():
                what = f"row {i} in a {tuple(logits.shape)} batch at {(b, t)}, {path}"
                got, ref = lp[b, t], want[i][0]
                assert torch.equal(got, ref), f"{what}: log-prob {got.item()!r} != {ref.item()!r}"
                if ent is not None:
                    got, ref = ent[b, t], want[i][1]
                    assert torch.equal(got, ref), f"{what}: entropy {got.item()!r} != {ref.item()!r}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("V,dtype", CASES)
def test_same_row_same_bits(backend, device, V, dtype):
    if device == "cuda" and dtype in ("fp16", "fp64") and V not in (3001, 16385):
        pytest.skip("fp16 / fp64 on the GPU: one register-tile and one streamed size (each case compiles kernels)")
    rows, labels = rows_of_interest(V, dtype, device)
    every = not (backend == "triton" and device == "cpu")
    check_every_placement(backend, rows, labels, TEMPERATURE[dtype], placements(rows, labels, every))


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKENDS if b == "triton"], ids=lambda x: x)
@pytest.mark.parametrize("V,dtype", [(37, "fp32"), (53, "bf16")])
def test_streamed_rows_small_tiles(monkeypatch, backend, device, V, dtype):
    """The streaming reduction on small rows (16-logit tiles, every row streamed): lazy rescaling mid-row, tiles
    wholly -inf, the last tile partial."""
    from credit_ops.triton_kernels import softmax_rows

    monkeypatch.setattr(softmax_rows, "ONE_TILE_MAX", 8)
    monkeypatch.setattr(softmax_rows, "STREAM_BLOCK", 16)
    rows, labels = rows_of_interest(V, dtype, device)
    rows[0, 16:32] = float("-inf")
    check_every_placement(backend, rows, labels, TEMPERATURE[dtype], placements(rows, labels, device == "cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_same_row_same_bits_full_vocabulary(backend, device):
    """Qwen's vocabulary (V = 151936, bf16), alone and among 7 rows."""
    rows, labels = rows_of_interest(151936, "bf16", device)
    check_every_placement(backend, rows, labels, 1.0, placements(rows, labels)[:3])


def exact_head(N, H, V, dtype, device, seed):
    """hidden (N, H), weight (V, H) whose every product and partial sum is exact in dtype (small integers times
    1/8): hidden @ weight.T then has the same bits however a matmul blocks or chunks its rows, so a chunked head is
    fed exactly the logits of the full product, and only its log-prob pass can make a difference."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (N, H), generator=g).to(DTYPES[dtype]).to(device)
    w = (torch.randint(-3, 4, (V, H), generator=g).double() / 8).to(DTYPES[dtype]).to(device)
    return h, w


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("V,dtype", [(37, "fp32"), (3001, "bf16"), (16385, "fp16"), (32771, "bf16")])
def test_fused_head_log_prob_pass(backend, device, V, dtype):
    """fused_linear_logprobs at chunk sizes 1, 5 and its default gives, for every token, the bits token_logprobs
    gives the same logits (hidden @ weight.T, exact by construction: checked)."""
    N, H = 13, 8
    h, w = exact_head(N, H, V, dtype, device, seed=V)
    labels = torch.randint(0, V, (N,), device=device)
    labels[[2, 7]] = IGNORE
    temperature = TEMPERATURE[dtype]
    logits = h @ w.t()
    assert torch.equal(logits[5:10], h[5:10] @ w.t()) and torch.equal(logits[3:4], h[3:4] @ w.t())
    with credit_ops.use_backend(backend):
        want_lp, want_ent = credit_ops.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
        for chunk in (1, 5, None):
            lp, ent = credit_ops.fused_linear_logprobs(
                h, w, labels, temperature=temperature, return_entropy=True, chunk_size=chunk
            )
            assert torch.equal(lp, want_lp), f"chunk_size={chunk}: {(lp - want_lp).abs().max().item()}"
            assert torch.equal(ent, want_ent), f"chunk_size={chunk}"


def test_long_row_kernel_is_a_rule_not_a_race(monkeypatch):
    """The Triton kernel runs unless CREDIT_OPS_ROWS_LAYOUT forces the cluster kernel: nothing is timed."""
    monkeypatch.delenv("CREDIT_OPS_ROWS_LAYOUT", raising=False)
    ran = []
    runs = {"two_pass": lambda: ran.append("two_pass"), "cluster": lambda: ran.append("cluster")}
    assert pl._layout(runs) == "two_pass" and ran == []
    monkeypatch.setenv("CREDIT_OPS_ROWS_LAYOUT", "cluster")
    assert pl._layout(runs) == "cluster" and ran == []


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="the cluster kernel runs on Hopper (sm_90) GPUs")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cluster_kernel_batch_invariant_cuda(monkeypatch, dtype):
    """The Hopper cluster kernel (opt-in) reduces a row in its own order: batch-invariant too, but its log-probs
    may differ from token_logprobs' in the last bits (the documented limit)."""
    monkeypatch.setenv("CREDIT_OPS_ROWS_LAYOUT", "cluster")
    rows, labels = rows_of_interest(151936, dtype, "cuda")
    want = {}
    for logits, y, where in placements(rows, labels):
        B, T, _ = logits.shape
        x = logits.contiguous().clone()
        w = torch.rand(B, T, device="cuda")
        kw = dict(use_triton=True, temperature=1.0, ignore_index=IGNORE, coef_given=True)
        _, lp, _ = pl.rows_forward(x, x, y.contiguous(), None, w, None, None, **kw)
        for i, (b, t) in where.items():
            assert torch.equal(lp[b, t], want.setdefault(i, lp[b, t])), f"row {i} in {tuple(logits.shape)}"
