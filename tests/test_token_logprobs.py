"""credit_ops.token_logprobs: every backend against a float64 computation written here (log-sum-exp, entropy
lse - sum p z, their gradients in closed form), gradients, opcheck, compile, errors."""

import pytest
import torch

import credit_ops
from tests.conftest import backend_devices

BACKENDS = backend_devices()
IDS = [f"{b}-{d}" for b, d in BACKENDS]
KERNELS = [pytest.param(b, d, id=f"{b}-{d}") for b, d in BACKENDS if b != "reference"]


def sample_inputs(shape, V, dtype, device="cpu", scale=3.0, ignore_frac=0.0, label_dtype=torch.int64):
    logits = (torch.randn(*shape, V, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, shape, dtype=label_dtype)
    if ignore_frac:
        labels[torch.rand(shape) < ignore_frac] = -100
    return logits.to(device), labels.to(device)


def run(backend, logits, labels, **kw):
    with credit_ops.use_backend(backend):
        return credit_ops.token_logprobs(logits, labels, return_entropy=True, **kw)


def expected(logits, labels, temperature=1.0):
    """float64 truth on the same (already rounded) input values: z = logits / T, logp = z_y - lse(z),
    entropy = lse(z) - sum_v p_v z_v (terms with p_v = 0 left out: z_v = -inf there); 0 on ignored labels."""
    z = logits.detach().cpu().double() / temperature
    labels = labels.cpu()
    ignored = labels == -100
    if z.numel() == 0:
        return torch.zeros(labels.shape, dtype=torch.float64), torch.zeros(labels.shape, dtype=torch.float64)
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse.unsqueeze(-1))
    lp = z.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - torch.where(p > 0, p * z, 0.0).sum(-1)
    return lp.masked_fill(ignored, 0.0), ent.masked_fill(ignored, 0.0)


def expected_grad(logits, labels, w_lp, w_ent, temperature=1.0):
    """d/dlogits of sum(w_lp * logp + w_ent * entropy), closed form (float64): with p = softmax(z),
    d logp / dz = onehot(y) - p and d entropy / dz = -p (log p + entropy), both divided by T."""
    z = logits.detach().cpu().double() / temperature
    labels = labels.cpu()
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    ent = -(p * logp_all).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0).long(), z.shape[-1]).double()
    keep = (labels != -100).double().unsqueeze(-1)
    g = w_lp.cpu().double().unsqueeze(-1) * (onehot - p) - w_ent.cpu().double().unsqueeze(-1) * p * (logp_all + ent)
    return g * keep / temperature


def assert_close(got, want, tol):
    got = got.cpu().double()
    assert torch.isfinite(got).all() == torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item() if want.numel() else 1))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "shape,V",
    [
        pytest.param(s, V, id=(f"B{s[0]}-T{s[1]}" if len(s) == 2 else f"N{s[0]}") + f"-V{V}")
        for s, V in (((3, 7), 37), ((5,), 1), ((0,), 11), ((2, 3), 1000), ((4,), 5003))
    ],
)
def test_parity(backend, device, dtype, shape, V):
    logits, labels = sample_inputs(shape, V, dtype, device, ignore_frac=0.2)
    for temperature in (1.0, 0.7):
        lp, ent = run(backend, logits, labels, temperature=temperature)
        assert lp.shape == labels.shape and ent.shape == labels.shape and lp.dtype == torch.float32
        want_lp, want_ent = expected(logits, labels, temperature=temperature)
        assert_close(lp, want_lp, 2e-5)
        assert_close(ent, want_ent, 2e-5)
        ignored = labels == -100
        assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_extreme_logits_and_neg_inf(backend, device):
    logits, labels = sample_inputs((6,), 300, torch.float32, scale=1.0)
    logits[0, :] = 1e4 * torch.sign(torch.randn(300))
    logits[1, ::3] = float("-inf")
    labels[1] = 1  # a finite entry
    logits[2, 5] = -1e4
    labels[2] = 5  # log-prob ~ -1e4, still finite
    logits[3, :] = -1e4
    logits[3, 7] = 1e4
    logits = logits.to(device)
    labels = labels.to(device)
    lp, ent = run(backend, logits, labels)
    want_lp, want_ent = expected(logits, labels)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert_close(lp, want_lp, 1e-5)
    assert_close(ent, want_ent, 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_rows_that_move_the_running_max(backend, device):
    """Rows whose maximum arrives late (every block rescales), early, or after blocks of -inf."""
    V = 5000
    logits = torch.randn(4, V, dtype=torch.float64)
    logits[0] = torch.linspace(-1e3, 1e3, V)  # increasing: a new max in every block
    logits[1] = torch.linspace(1e3, -1e3, V)  # decreasing: the max in the first block
    logits[2, :4200] = float("-inf")  # leading blocks entirely -inf
    logits[3] = torch.linspace(-30, 30, V) + torch.randn(V)
    labels = torch.tensor([V - 1, 3, 4500, 2500])
    logits, labels = logits.float().to(device), labels.to(device)
    lp, ent = run(backend, logits, labels)
    want_lp, want_ent = expected(logits, labels)
    assert_close(lp, want_lp, 1e-5)
    assert_close(ent, want_ent, 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=["int32_labels", "int64_labels"])
def test_leading_dims_and_label_dtypes(backend, device, label_dtype):
    logits, labels = sample_inputs((2, 3, 4), 129, torch.float32, device, label_dtype=label_dtype)
    lp, ent = run(backend, logits, labels)
    flat_lp, flat_ent = run(backend, logits.reshape(-1, 129), labels.reshape(-1))
    torch.testing.assert_close(lp.reshape(-1), flat_lp)
    torch.testing.assert_close(ent.reshape(-1), flat_ent)
    # Strided views (the logits[:, :-1] slice of a (B, T + 1, V) output, a sliced vocabulary) give the same
    # result as their contiguous copies.
    wide = torch.randn(2, 4, 300, device=device)
    labels2 = labels[0].to(device)
    for view in (wide[:, :-1], wide[..., :129], wide[:, 1:, :129]):
        lbl = labels2[:, : view.shape[1]] if view.shape[-1] == 129 else torch.randint(0, 300, view.shape[:2])
        lbl = lbl[: view.shape[0], : view.shape[1]].to(device)
        lp_view, ent_view = run(backend, view, lbl)
        lp_copy, ent_copy = run(backend, view.contiguous(), lbl)
        torch.testing.assert_close(lp_view, lp_copy)
        torch.testing.assert_close(ent_view, ent_copy)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_large_vocabulary(backend, device):
    logits, labels = sample_inputs((3,), 151936, torch.bfloat16, device, scale=4.0)
    lp, ent = run(backend, logits, labels)
    want_lp, want_ent = expected(logits, labels)
    assert_close(lp, want_lp, 2e-5)
    assert_close(ent, want_ent, 2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_backward_matches_closed_form(backend, device):
    logits, labels = sample_inputs((4, 5), 77, torch.float32, device, ignore_frac=0.25)
    w_lp, w_ent = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    x = logits.detach().clone().requires_grad_()
    lp, ent = run(backend, x, labels, temperature=0.8)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    want = expected_grad(logits, labels, w_lp, w_ent, temperature=0.8)
    torch.testing.assert_close(x.grad.cpu().double(), want, rtol=1e-4, atol=1e-6)
    assert (x.grad[labels == -100] == 0).all()
    # logprobs alone (entropy unused) takes the cheaper backward path.
    x = logits.detach().clone().requires_grad_()
    with credit_ops.use_backend(backend):
        credit_ops.token_logprobs(x, labels).sum().backward()
    want = expected_grad(logits, labels, torch.ones(4, 5), torch.zeros(4, 5))
    torch.testing.assert_close(x.grad.cpu().double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradcheck_float64(backend, device):
    logits, labels = sample_inputs((3, 4), 13, torch.float64, device, scale=1.5, ignore_frac=0.2)
    logits.requires_grad_()

    def f(x):
        return run(backend, x, labels, temperature=0.9)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)


def _ops(backend):
    if backend == "triton":
        return torch.ops.credit.token_logprobs_fwd_triton, torch.ops.credit.token_logprobs_bwd_triton
    return torch.ops.credit.token_logprobs_fwd, torch.ops.credit.token_logprobs_bwd


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("return_entropy", [False, True], ids=["logprobs_only", "with_entropy"])
def test_opcheck(backend, device, return_entropy):
    fwd, bwd = _ops(backend)
    logits, labels = sample_inputs((2, 3), 33, torch.float32, device, ignore_frac=0.3)
    for requires_grad in (False, True):
        x = logits.clone().requires_grad_(requires_grad)
        torch.library.opcheck(fwd, (x, labels, 0.9, -100, return_entropy))
    lp, ent, lse = fwd(logits, labels, 0.9, -100, True)
    g = torch.randn_like(lp)
    torch.library.opcheck(
        bwd, (g, g if return_entropy else None, logits, labels, lse, ent if return_entropy else None, 0.9, -100)
    )


@pytest.mark.parametrize("backend,device", KERNELS)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    logits, labels = sample_inputs((2, 5), 50, torch.float32, device, ignore_frac=0.2)

    def step(x, y):
        with credit_ops.use_backend(backend):
            lp, ent = credit_ops.token_logprobs(x, y, temperature=0.7, return_entropy=True)
        return (lp * 2).sum() + ent.mean()

    compiled = torch.compile(step, fullgraph=True)
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    out, want = compiled(x1, labels), step(x2, labels)
    torch.testing.assert_close(out, want)
    out.backward()
    want.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_no_grad_allocates_nothing_of_vocab_size():
    N, V = 64, 8192
    logits, labels = sample_inputs((N,), V, torch.bfloat16)
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        credit_ops.token_logprobs(logits, labels, return_entropy=True)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < biggest < N * V  # outputs only: O(N) floats, nothing O(N * V)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_grad_memory():
    N, V = 512, 32000
    logits, labels = sample_inputs((N,), V, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        credit_ops.token_logprobs(logits, labels, return_entropy=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < N * V


# ---- bad input: every error names the argument and comes before any kernel; one case each
BAD = [
    pytest.param("labels must have shape", lambda x, y: (x, y[:3]), {}, id="labels_wrong_shape"),
    pytest.param("labels must lie in", lambda x, y: (x, torch.tensor([0, 1, 10, 2])), {}, id="label_above_vocab"),
    pytest.param("labels must lie in", lambda x, y: (x, torch.tensor([0, -1, 3, 2])), {}, id="negative_label"),
    pytest.param("temperature must be > 0", lambda x, y: (x, y), dict(temperature=0.0), id="zero_temperature"),
    pytest.param("temperature must be > 0", lambda x, y: (x, y), dict(temperature=-1.0), id="negative_temperature"),
    pytest.param("logits must have dtype", lambda x, y: (x.long(), y), {}, id="integer_logits"),
    pytest.param("labels must have dtype", lambda x, y: (x, y.to(torch.int16)), {}, id="int16_labels"),
    pytest.param("labels must have dtype", lambda x, y: (x, y.float()), {}, id="float_labels"),
    pytest.param("logits must be a torch.Tensor", lambda x, y: (x.tolist(), y), {}, id="logits_a_list"),
    pytest.param("non-empty vocabulary", lambda x, y: (torch.randn(4, 0), y), {}, id="empty_vocabulary"),
    pytest.param(
        "labels must lie in",
        lambda x, y: (x, torch.tensor([0, -100, 3, 2])),
        dict(ignore_index=-1),
        id="minus_100_with_other_ignore_index",
    ),
    pytest.param(
        "one device",
        lambda x, y: (x.cuda(), y),
        {},
        id="logits_on_cuda_labels_on_cpu",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


@pytest.mark.parametrize("match,make,kw", BAD)
def test_bad_input(match, make, kw):
    logits, labels = sample_inputs((4,), 10, torch.float32)
    with pytest.raises(ValueError, match=match):
        credit_ops.token_logprobs(*make(logits, labels), **kw)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cpu_simd_paths(isa):
    """The CPU kernels' narrower SIMD paths (picked on older CPUs) agree with the reference too (token_logprobs and
    the policy-loss gradient share the SIMD row pass)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, credit_ops\n"
        "from credit_ops import reference\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(3, 5, 1037) * 3; y = torch.randint(0, 1037, (3, 5)); x[0, 0, ::7] = float('-inf')\n"
        "y[0, 0] = 1\n"
        "lp, ent = credit_ops.token_logprobs(x, y, return_entropy=True)\n"
        "want = reference.token_logprobs(x.double(), y, return_entropy=True)\n"
        "torch.testing.assert_close(lp.double(), want[0], rtol=2e-5, atol=2e-5)\n"
        "torch.testing.assert_close(ent.double(), want[1], rtol=2e-5, atol=2e-5)\n"
        "adv = torch.randn(3)\n"
        "x1 = x.clone().requires_grad_(); credit_ops.policy_loss(x1, y, adv)[0].backward()\n"
        "x2 = x.clone().requires_grad_()\n"
        "with credit_ops.use_backend('reference'): credit_ops.policy_loss(x2, y, adv)[0].backward()\n"
        "torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)\n"
    )
    env = {**os.environ, "CREDIT_OPS_CPU_ISA": isa}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
