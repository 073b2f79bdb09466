"""group_advantages, ibpo_shaping, token_advantages: hand-computed cases and TRL's formula on every backend (the
reference's too), the kernels against the reference on random batches, opcheck, bad input."""

import math

import pytest
import torch

import credit_ops
from credit_ops import reference
from tests.conftest import backend_devices

# Only the C++/CUDA kernels and the reference implement these ops (no Triton variant). The reference is checked by
# the hand-computed cases; the random cases compare the kernels with it.
PAIRS = [(b, d) for b, d in backend_devices() if b != "triton"]
KERNEL_PAIRS = [(b, d) for b, d in PAIRS if b != "reference"]
MODES = ("grpo", "dr_grpo", "rloo", "batch")


def _ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def random_groups(n_groups, max_size, device="cpu", dtype=torch.float32, binary=False):
    """Unsorted group ids of unequal sizes (1..max_size), rewards in [0, 1] (or {0, 1})."""
    sizes = torch.randint(1, max_size + 1, (n_groups,))
    ids = torch.repeat_interleave(torch.arange(n_groups), sizes)
    ids = ids[torch.randperm(ids.numel())]
    r = torch.randint(0, 2, ids.shape).to(dtype) if binary else torch.rand(ids.shape, dtype=dtype)
    return r.to(device), ids.to(device)


# ---- group_advantages
@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_group_advantages_hand_computed(backend, device):
    r, g = on(device, torch.tensor([1.0, 0.0, 0.0, 0.5, 0.7]), torch.tensor([0, 0, 0, 1, 2]))
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased
    expect = {
        "grpo": [(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), 0.0, 0.0],
        "dr_grpo": [2 / 3, -1 / 3, -1 / 3, 0, 0],
        "rloo": [1.0, -0.5, -0.5, 0, 0],  # r minus the mean of the others: 1 - 0, 0 - 0.5, 0 - 0.5
        # the whole batch one group: mean 0.44, unbiased std sqrt(0.772 / 4)
        "batch": [(x - 0.44) / (math.sqrt(0.772 / 4) + 1e-6) for x in (1.0, 0.0, 0.0, 0.5, 0.7)],
    }
    with credit_ops.use_backend(backend):
        for mode, want in expect.items():
            torch.testing.assert_close(credit_ops.group_advantages(r, g, mode=mode).cpu(), torch.tensor(want), msg=mode)


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_matches_trl_formula(backend, device, mode):
    # TRL: rewards.view(-1, G); r - mean, divided by (std + 1e-4) for grpo, std unbiased (torch.std default);
    # RLOO: r minus the mean of the other G - 1 samples.
    r = torch.rand(6 * 8, dtype=torch.float64)
    grouped = r.view(6, 8)
    centred = grouped - grouped.mean(1, keepdim=True)
    want = {
        "grpo": centred / (grouped.std(1, keepdim=True) + 1e-4),
        "dr_grpo": centred,
        "rloo": grouped - (grouped.sum(1, keepdim=True) - grouped) / 7,
    }[mode].view(-1)
    perm = torch.randperm(r.numel())  # unsorted group ids
    ids = torch.arange(6).repeat_interleave(8)
    with credit_ops.use_backend(backend):
        out = credit_ops.group_advantages(*on(device, r[perm], ids[perm]), mode=mode, eps=1e-4)
    torch.testing.assert_close(out.cpu(), want[perm])


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS, ids=_ids(KERNEL_PAIRS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_group_advantages_random_vs_reference(backend, device, mode, dtype):
    r, g = random_groups(37, 9, device, dtype)
    with credit_ops.use_backend(backend):
        out = credit_ops.group_advantages(r, g, mode=mode)
    expect = reference.group_advantages(r.cpu(), g.cpu(), mode=mode)
    assert out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_group_advantages_edge_groups(backend, device):
    # all-correct group, all-wrong group, a group of one, a constant non-binary group; unsorted ids, int32.
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.3, 1.0, 0.0, 0.3], device=device)
    g = torch.tensor([0, 1, 0, 1, 3, 0, 1, 3], dtype=torch.int32, device=device)
    with credit_ops.use_backend(backend):
        for mode in ("grpo", "dr_grpo", "rloo"):
            out = credit_ops.group_advantages(r, g, mode=mode)
            assert torch.equal(out.cpu(), torch.zeros(8)), mode
        alone = credit_ops.group_advantages(torch.tensor([0.9], device=device), torch.tensor([0], device=device))
        assert alone.item() == 0.0


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_group_advantages_sparse_ids_and_half(backend, device):
    r = torch.tensor([1.0, 0.0, 0.5, 0.25], device=device, dtype=torch.bfloat16)
    g = torch.tensor([1000, 7, 1000, 7], device=device)
    with credit_ops.use_backend(backend):
        out = credit_ops.group_advantages(r, g, num_groups=1001, mode="dr_grpo")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), torch.tensor([0.25, -0.125, -0.25, 0.125]))


def test_group_advantages_many_groups_large():
    r, g = random_groups(1024, 16, binary=True)
    torch.testing.assert_close(credit_ops.group_advantages(r, g), reference.group_advantages(r, g))


_R, _G = torch.rand(4), torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize(
    "match,args,kw",
    [
        pytest.param("mode must be one of", (_R, _G), dict(mode="ppo"), id="unknown_mode"),
        pytest.param("group_ids must have shape", (_R, _G[:3]), {}, id="group_ids_wrong_shape"),
        pytest.param("rewards must be finite", (torch.tensor([0.0, float("nan"), 1.0, 1.0]), _G), {}, id="nan_reward"),
        pytest.param("group_ids must lie in", (_R, torch.tensor([0, 0, 9, 1])), {}, id="group_id_beyond_n"),
        pytest.param(
            "group_ids must lie in", (_R, torch.tensor([0, -1, 1, 1])), dict(num_groups=2), id="negative_group_id"
        ),
        pytest.param("group_ids must have dtype", (_R, _G.float()), {}, id="float_group_ids"),
        pytest.param("rewards must have 1 dimensions", (_R.view(2, 2), _G), {}, id="rewards_2d"),
    ],
)
def test_group_advantages_bad_input(match, args, kw):
    with pytest.raises(ValueError, match=match):
        credit_ops.group_advantages(*args, **kw)


# ---- ibpo_shaping
@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_ibpo_shaping_hand_computed(backend, device):
    rewards = torch.tensor([0.0, 1.0, 0.2, 0.0, 0.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    correct = torch.tensor(
        [[True, False, True], [True, True, True], [False, False, False], [True, True, False], [True, False, False]]
    )
    valid = torch.tensor(
        [[True, True, True], [True, True, True], [True, True, False], [True, False, False], [False, False, False]]
    )
    rewards, g, correct, valid = on(device, rewards, g, correct, valid)
    with credit_ops.use_backend(backend):
        shaped, phi = credit_ops.ibpo_shaping(rewards, g, correct, valid)
        shaped2, phi2 = credit_ops.ibpo_shaping(rewards, None, correct, valid, rho=1.0, lam=2.0, threshold=0.1)
    rewards, shaped, phi, shaped2, phi2 = (t.cpu() for t in (rewards, shaped, phi, shaped2, phi2))
    # sample 0: 2 of 3 correct -> 0.5 * 2/3; 1: correct sample -> 0; 2: none correct; 3: 1 valid, correct -> 0.5;
    # 4: no valid revision -> 0 (its correct flag in an invalid column does not count)
    expect_phi = torch.tensor([1 / 3, 0.0, 0.0, 0.5, 0.0])
    torch.testing.assert_close(phi, expect_phi)
    torch.testing.assert_close(shaped, rewards + 0.6 * expect_phi)
    torch.testing.assert_close(phi2, torch.tensor([2 / 3, 0.0, 0.0, 1.0, 0.0]))  # 0.2 >= 0.1 counts as correct
    torch.testing.assert_close(shaped2, rewards + 2.0 * phi2)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS, ids=_ids(KERNEL_PAIRS))
def test_ibpo_shaping_random_vs_reference(backend, device):
    r, g = random_groups(20, 8, device, binary=True)
    correct = torch.rand(r.shape[0], 5, device=device) < 0.4
    valid = torch.rand(r.shape[0], 5, device=device) < 0.7
    with credit_ops.use_backend(backend):
        shaped, phi = credit_ops.ibpo_shaping(r, g, correct, valid, rho=0.7, lam=0.3)
    es, ep = reference.ibpo_shaping(r.cpu(), g.cpu(), correct.cpu(), valid.cpu(), rho=0.7, lam=0.3)
    torch.testing.assert_close(shaped.cpu(), es)
    torch.testing.assert_close(phi.cpu(), ep)


_Z, _ZG, _C = torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.bool)


@pytest.mark.parametrize(
    "match,args",
    [
        pytest.param("revision_correct must have shape", (_Z, _ZG, _C[:2], _C[:2]), id="revisions_wrong_rows"),
        pytest.param(
            "revision_valid must have shape",
            (_Z, _ZG, _C, torch.zeros(3, 3, dtype=torch.bool)),
            id="valid_wrong_columns",
        ),
        pytest.param("revision_correct must have dtype", (_Z, _ZG, _C.int(), _C), id="int_revision_correct"),
        pytest.param("rewards must be finite", (torch.tensor([0.0, float("inf"), 0.0]), _ZG, _C, _C), id="inf_reward"),
    ],
)
def test_ibpo_shaping_bad_input(match, args):
    with pytest.raises(ValueError, match=match):
        credit_ops.ibpo_shaping(*args)


# ---- token_advantages
@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_token_advantages_hand_computed(backend, device):
    seq_adv = torch.tensor([1.5, -1.0, 0.8, -0.5])
    mask = torch.tensor(
        [
            [True, False, True, False],
            [False, True, True, False],
            [True, True, False, False],
            [False, False, False, True],
        ]
    )
    wrong = torch.tensor([True, True, False, True])
    has_repair = torch.tensor([True, True, True, False])  # a correct sample's repair flag is ignored
    seq_adv, mask, wrong, has_repair = on(device, seq_adv, mask, wrong, has_repair)
    with credit_ops.use_backend(backend):
        adv, gates = (t.cpu() for t in credit_ops.token_advantages(seq_adv, mask, wrong=wrong, has_repair=has_repair))
        adv2, gates2 = (
            t.cpu()
            for t in credit_ops.token_advantages(
                seq_adv,
                mask,
                wrong=wrong,
                has_repair=has_repair,
                sign_guard=False,
                unmasked_weight=0.25,
                correct_in_loss=False,
                lengths=torch.tensor([4, 3, 4, 2], device=device),
                prompt_lengths=torch.tensor([1, 0, 0, 0], device=device),
            )
        )
    # row 0: repaired failure with positive advantage: the sign guard clamps the masked credit to 0
    # row 1: repaired failure, negative: -1 on the flagged tokens only; rows 2, 3: sequence credit everywhere
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0, 0, 0], [0, -1, -1, 0], [0.8] * 4, [-0.5] * 4]))
    torch.testing.assert_close(gates, torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [1.0] * 4, [1.0] * 4]))
    # no sign guard, unmasked weight 0.25, correct samples dropped, row 0's prompt and the lengths unscored
    torch.testing.assert_close(adv2[0], torch.tensor([0.0, 0.25 * 1.5, 1.5, 0.25 * 1.5]))
    torch.testing.assert_close(gates2[1], torch.tensor([0.25, 1.0, 1.0, 0.0]))
    assert torch.equal(adv2[2], torch.zeros(4)) and torch.equal(gates2[2], torch.zeros(4))  # correct: dropped
    torch.testing.assert_close(adv2[3], torch.tensor([-0.5, -0.5, 0.0, 0.0]))


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_token_advantages_repair_rows(backend, device):
    seq_adv = torch.tensor([-1.2, 0.7, 2.0])
    mask = torch.zeros(3, 4, dtype=torch.bool)
    wrong = torch.tensor([True, True, False])
    has_repair = torch.tensor([True, True, False])
    repair_mask = torch.tensor(
        [
            [True, False, True, True],
            [False, True, False, False],
            [True, True, True, True],
            [True, True, True, True],
            [True, True, True, True],
        ]
    )
    repair_of = torch.tensor([0, 1, 2, -1, 1])
    seq_adv, mask, wrong, has_repair, repair_mask, repair_of, repair_lengths = on(
        device, seq_adv, mask, wrong, has_repair, repair_mask, repair_of, torch.tensor([3, 4, 4, 4, 4])
    )
    with credit_ops.use_backend(backend):
        out = credit_ops.token_advantages(
            seq_adv,
            mask,
            wrong=wrong,
            has_repair=has_repair,
            repair_mask=repair_mask,
            repair_of=repair_of,
            repair_lengths=repair_lengths,
        )
    r_adv, r_gates = out[2].cpu(), out[3].cpu()
    torch.testing.assert_close(r_adv[0], torch.tensor([1.2, 0.0, 1.2, 0.0]))  # +|A|, cut at its length 3
    torch.testing.assert_close(r_adv[1], torch.tensor([0.0, 0.7, 0.0, 0.0]))
    assert torch.equal(r_adv[2], torch.zeros(4)) and torch.equal(r_adv[3], torch.zeros(4))  # correct / padding
    torch.testing.assert_close(r_gates, (r_adv != 0).float())


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS, ids=_ids(KERNEL_PAIRS))
@pytest.mark.parametrize("sign_guard", [True, False], ids=["sign_guard", "no_sign_guard"])
@pytest.mark.parametrize("correct_in_loss", [True, False], ids=["correct_in_loss", "correct_dropped"])
def test_token_advantages_random_vs_reference(backend, device, sign_guard, correct_in_loss):
    B, T = 33, 70
    seq_adv = torch.randn(B, device=device)
    mask = torch.rand(B, T, device=device) < 0.2
    wrong = torch.rand(B, device=device) < 0.6
    has_repair = torch.rand(B, device=device) < 0.5
    lengths = torch.randint(0, T + 1, (B,), device=device)
    starts = (lengths * torch.rand(B, device=device)).long()
    kw = dict(
        wrong=wrong,
        has_repair=has_repair,
        sign_guard=sign_guard,
        unmasked_weight=0.1,
        correct_in_loss=correct_in_loss,
        lengths=lengths,
        prompt_lengths=starts,
    )
    with credit_ops.use_backend(backend):
        adv, gates = credit_ops.token_advantages(seq_adv, mask, **kw)
    ea, eg = reference.token_advantages(seq_adv, mask, **kw)
    torch.testing.assert_close(adv, ea)
    torch.testing.assert_close(gates, eg)
    if sign_guard:  # a repaired failure never gets positive credit on any token
        assert (adv[wrong & has_repair] <= 0).all()


_A, _M, _W = torch.zeros(3), torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)


@pytest.mark.parametrize(
    "match,args,kw",
    [
        pytest.param("seq_adv must have shape", (_A[:2], _M), {}, id="seq_adv_wrong_shape"),
        pytest.param("mask must have dtype", (_A, _M.float()), {}, id="float_mask"),
        pytest.param("has_repair must have shape", (_A, _M), dict(has_repair=_W[:1]), id="has_repair_wrong_shape"),
        pytest.param("lengths must lie in", (_A, _M), dict(lengths=torch.tensor([1, 5, 2])), id="length_beyond_T"),
        pytest.param("seq_adv must be finite", (torch.tensor([0.0, float("nan"), 0.0]), _M), {}, id="nan_seq_adv"),
        pytest.param(
            "repair_of must lie in",
            (_A, _M),
            dict(repair_mask=_M, repair_of=torch.tensor([0, 3, 1])),
            id="repair_of_beyond_n",
        ),
        pytest.param("unmasked_weight must lie in", (_A, _M), dict(unmasked_weight=1.5), id="unmasked_weight_above_1"),
        pytest.param("repair_mask needs repair_of", (_A, _M), dict(repair_mask=_M), id="repair_mask_without_repair_of"),
    ],
)
def test_token_advantages_bad_input(match, args, kw):
    with pytest.raises(ValueError, match=match):
        credit_ops.token_advantages(*args, **{"wrong": _W, "has_repair": _W, **kw})


# ---- op-level checks (schemas, fake kernels, dispatch)
def _op_samples(device):
    r, g = random_groups(5, 4, device)
    n = r.shape[0]
    counts = torch.randint(0, 3, (n,), device=device)
    mask = torch.rand(n, 6, device=device) < 0.3
    flags = torch.rand(n, device=device) < 0.5
    lengths = torch.randint(0, 7, (n,), device=device)
    return [
        (torch.ops.credit.group_advantages.default, (r, g, 5, 0, 1e-6)),
        (torch.ops.credit.group_advantages.default, (r.double(), g.int(), 5, 2, 1e-6)),
        (torch.ops.credit.ibpo_shaping.default, (r, counts, counts + 1, 0.5, 0.6, 0.5)),
        (torch.ops.credit.token_advantages.default, (r, mask, flags, ~flags, lengths, None, True, 0.0, True)),
        (torch.ops.credit.token_advantages.default, (r, mask, flags, flags, None, lengths // 2, False, 0.5, False)),
        (
            torch.ops.credit.repair_advantages.default,
            (r, mask, torch.arange(n, device=device) - 1, flags, lengths, None),
        ),
    ]


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_kernels_large():
    r, g = random_groups(1024, 16, "cuda", binary=True)
    for mode in MODES:
        torch.testing.assert_close(
            credit_ops.group_advantages(r, g, mode=mode).cpu(),
            credit_ops.group_advantages(r.cpu(), g.cpu(), mode=mode),
            rtol=1e-5,
            atol=1e-5,
        )
    B, T = r.shape[0], 257
    mask = torch.rand(B, T, device="cuda") < 0.1
    flags = torch.rand(B, device="cuda") < 0.5
    lengths = torch.randint(0, T + 1, (B,), device="cuda")
    kw = dict(wrong=flags, has_repair=~flags, lengths=lengths)
    out = credit_ops.token_advantages(r, mask, **kw)
    ref = credit_ops.token_advantages(r.cpu(), mask.cpu(), **{k: v.cpu() for k, v in kw.items()})
    for o, e in zip(out, ref, strict=True):
        torch.testing.assert_close(o.cpu(), e)


def test_torch_compile_fullgraph():
    r, g = random_groups(6, 5)
    mask = torch.rand(r.shape[0], 9) < 0.3
    wrong, has_repair = r < 0.5, torch.rand(r.shape[0]) < 0.5

    def credit(r, g, mask, wrong, has_repair):
        adv = credit_ops.group_advantages(r, g, num_groups=6)
        return credit_ops.token_advantages(adv, mask, wrong=wrong, has_repair=has_repair, unmasked_weight=0.2)

    compiled = torch.compile(credit, fullgraph=True)
    for got, want in zip(compiled(r, g, mask, wrong, has_repair), credit(r, g, mask, wrong, has_repair), strict=True):
        torch.testing.assert_close(got, want)


def test_group_advantages_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(
        st.lists(st.tuples(st.integers(0, 7), st.floats(-5, 5, allow_nan=False, width=32)), min_size=1, max_size=40),
        st.sampled_from(MODES),
    )
    def check(rows, mode):
        g = torch.tensor([x for x, _ in rows])
        r = torch.tensor([y for _, y in rows], dtype=torch.float64)
        out = credit_ops.group_advantages(r, g, mode=mode, num_groups=8)
        torch.testing.assert_close(out, reference.group_advantages(r, g, mode=mode, num_groups=8))
        # shift invariance of every mode, and zero mean within each group for grpo / dr_grpo / rloo
        torch.testing.assert_close(credit_ops.group_advantages(r + 3.0, g, mode=mode, num_groups=8), out)
        if mode != "batch":
            sums = torch.zeros(8, dtype=torch.float64).index_add_(0, g, out)
            torch.testing.assert_close(sums, torch.zeros(8, dtype=torch.float64), atol=1e-9, rtol=0)

    check()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_repair_rows_of_correct_samples_get_nothing(backend):
    """A repair row whose sample is correct gets no credit, even when the caller marks the sample has_repair."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    repair_mask = torch.ones(2, 4, dtype=torch.bool)
    with credit_ops.use_backend(backend):
        _, _, r_adv, r_gates = credit_ops.token_advantages(
            torch.tensor([-1.0, 2.0]),
            mask,
            wrong=torch.tensor([True, False]),
            has_repair=torch.tensor([True, True]),
            repair_mask=repair_mask,
            repair_of=torch.tensor([0, 1]),
        )
    assert torch.equal(r_gates, torch.tensor([[1.0] * 4, [0.0] * 4]))
    assert torch.equal(r_adv, torch.tensor([[1.0] * 4, [0.0] * 4]))
