"""credit_assign: hand-computed cases, parity with the per-sample loop reference (reference.credit_assign) on
random batches for every algorithm, edge groups, the sign guard, the edit-ratio rule, bad input, CUDA graphs."""

import math

import pytest
import torch

import credit_ops
from credit_ops import reference
from credit_ops.reference import ALGORITHMS
from tests.conftest import backend_devices

PAIRS = [(b, d) for b, d in backend_devices() if b != "triton"]
FIELDS = (
    "advantages",
    "gates",
    "seq_advantages",
    "shaped_rewards",
    "phi",
    "wrong",
    "has_repair",
    "repair_index",
    "masks",
    "repair_advantages",
    "repair_gates",
    "repair_selected",
    "repair_distance",
    "repair_accepted",
)
DELIM = 3


def _ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


def rollout_batch(n_groups=4, max_size=5, T=18, vocab=6, device="cpu", prompt=False, seed=0):
    """Unsorted unequal groups with binary rewards; 0-3 repairs per wrong sample (and a few for correct ones,
    which must be ignored), each a few point edits of its sample or a full rewrite; some padded slots."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=gen)
    gid = torch.repeat_interleave(torch.arange(n_groups), sizes)
    gid = gid[torch.randperm(gid.numel(), generator=gen)]
    N = gid.numel()
    rewards = torch.randint(0, 2, (N,), generator=gen).float()
    tokens = torch.randint(0, vocab, (N, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (N,), generator=gen)
    pl = torch.randint(0, 4, (N,), generator=gen) if prompt else torch.zeros(N, dtype=torch.long)
    rows, rlens, rof, rok = [], [], [], []
    for i in range(N):
        for _ in range(int(torch.randint(0, 4 if rewards[i] == 0 else 2, (1,), generator=gen))):
            seq = tokens[i, : lengths[i]].tolist()
            if torch.rand(1, generator=gen) < 0.2:  # a rewrite: rejected by the edit-ratio rule
                seq = seq[: pl[i]] + torch.randint(0, vocab, (len(seq) - pl[i],), generator=gen).tolist()
            else:
                for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
                    p = int(torch.randint(int(pl[i]), max(len(seq), int(pl[i]) + 1), (1,), generator=gen))
                    op = int(torch.randint(0, 3, (1,), generator=gen))
                    if op == 0 and len(seq) < T:
                        seq.insert(p, int(torch.randint(0, vocab, (1,), generator=gen)))
                    elif op == 1 and p < len(seq) and len(seq) > pl[i] + 1:
                        del seq[p]
                    elif p < len(seq):
                        seq[p] = (seq[p] + 1) % vocab
            rows.append(seq + [0] * (T - len(seq)))
            rlens.append(len(seq))
            rof.append(i)
            rok.append(bool(torch.rand(1, generator=gen) < 0.7))
    rows += [[0] * T] * 2  # padded slots
    rlens += [0, 0]
    rof += [-1, -1]
    rok += [True, False]
    perm = torch.randperm(len(rows), generator=gen)
    t = lambda x, **kw: torch.tensor(x, **kw)[perm].to(device)
    batch = dict(
        tokens=tokens.to(device),
        lengths=lengths.to(device),
        group_ids=gid.to(device),
        rewards=rewards.to(device),
        repair_tokens=t(rows),
        repair_lengths=t(rlens),
        repair_of=t(rof),
        repair_correct=t(rok, dtype=torch.bool),
    )
    if prompt:
        batch["prompt_lengths"] = pl.to(device)
    return batch


def assert_matches_reference(out, ref):
    for name in FIELDS:
        got, want = getattr(out, name), ref[name]
        torch.testing.assert_close(got.cpu().to(want.dtype), want.cpu(), rtol=1e-5, atol=1e-5, msg=name)
    for name, want in ref["metrics"].items():
        assert out.metrics[name].dim() == 0
        assert out.metrics[name].item() == pytest.approx(want, rel=1e-5, abs=1e-6), name


def test_hand_computed_ibpo():
    # group 0: a correct sample and a wrong one whose verified repair substitutes one token.
    tokens = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    out = credit_ops.credit_assign(
        tokens,
        torch.tensor([4, 4]),
        torch.tensor([0, 0]),
        torch.tensor([1.0, 0.0]),
        torch.tensor([[1, 9, 3, 4]]),
        torch.tensor([4]),
        torch.tensor([1]),
        torch.tensor([True]),
        algorithm="ibpo",
    )
    # phi = 0.5 (1 of 1 revisions correct); R' = [1, 0.3]; mean 0.65, unbiased std 0.35 * sqrt(2)
    a = 0.35 / (0.35 * math.sqrt(2) + 1e-6)
    torch.testing.assert_close(out.phi, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(out.shaped_rewards, torch.tensor([1.0, 0.3]))
    torch.testing.assert_close(out.seq_advantages, torch.tensor([a, -a]))
    torch.testing.assert_close(out.advantages, torch.tensor([[a] * 4, [0.0, -a, 0.0, 0.0]]))
    torch.testing.assert_close(out.gates, torch.tensor([[1.0] * 4, [0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.repair_advantages, torch.tensor([[0.0, a, 0.0, 0.0]]))
    assert out.repair_selected.tolist() == [True] and out.repair_index.tolist() == [-1, 0]
    assert out.metrics["mean_edit_distance"].item() == 1.0
    assert out.metrics["repair_success_rate"].item() == 1.0
    assert out.metrics["active_token_ratio"].item() == pytest.approx(5 / 8)

    grpo = credit_ops.credit_assign(
        tokens, torch.tensor([4, 4]), torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), algorithm="grpo"
    )
    b = 0.5 / (0.5 * math.sqrt(2) + 1e-6)
    torch.testing.assert_close(grpo.advantages, torch.tensor([[b] * 4, [-b] * 4]))
    assert grpo.repair_advantages is None and grpo.metrics["active_token_ratio"].item() == 1.0


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_random_vs_loop_reference(backend, device, algorithm):
    batch = rollout_batch(device=device, seed=list(ALGORITHMS).index(algorithm))
    with credit_ops.use_backend(backend):
        out = credit_ops.credit_assign(**batch, algorithm=algorithm)
    ref = reference.credit_assign(**{k: v.cpu() for k, v in batch.items()}, algorithm=algorithm)
    assert_matches_reference(out, ref)


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
@pytest.mark.parametrize(
    "options",
    [
        dict(granularity="step", delimiter_ids=[DELIM]),
        dict(granularity="step", delimiter_ids=[DELIM, 4], k=1, algorithm="iop"),
        dict(k=1, algorithm="iop"),
        dict(k=2, insert_anchor="next", sign_guard=False, train_on_repair=False, unmasked_weight=0.1),
        dict(algorithm="diff_feedback", correct_in_loss=False, max_edit_ratio=0.2, adv_mode="rloo"),
        dict(algorithm="ibpo", rho=1.0, lam=0.3, threshold=0.7, adv_mode="batch", insert_anchor="none"),
    ],
    ids=["step", "step-k1-iop", "k1-iop", "k2-next-noguard", "df-ratio-rloo", "ibpo-batch"],
)
def test_options_vs_loop_reference(backend, device, options):
    batch = rollout_batch(n_groups=5, device=device, prompt=True, seed=7)
    with credit_ops.use_backend(backend):
        out = credit_ops.credit_assign(**batch, **options)
    ref = reference.credit_assign(**{k: v.cpu() for k, v in batch.items()}, **options)
    assert_matches_reference(out, ref)
    pl = batch["prompt_lengths"]
    prompt = torch.arange(out.advantages.shape[1], device=device) < pl.unsqueeze(1)
    assert (out.gates[prompt] == 0).all() and (out.advantages[prompt] == 0).all()


def test_all_correct_and_all_wrong_groups():
    tokens = torch.randint(0, 5, (6, 8))
    lengths = torch.full((6,), 8)
    gid = torch.tensor([0, 1, 0, 1, 0, 1])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])  # group 0 all correct, group 1 all wrong
    # group 1's repairs: one unverified, one verified rewrite (rejected by the edit ratio)
    rt = torch.stack([tokens[1], (tokens[3] + 1) % 5])
    out = credit_ops.credit_assign(
        tokens, lengths, gid, rewards, rt, torch.tensor([8, 8]), torch.tensor([1, 3]), torch.tensor([False, True])
    )
    assert torch.equal(out.advantages, torch.zeros(6, 8)) and torch.equal(out.gates, torch.ones(6, 8))
    assert not out.has_repair.any() and not out.repair_selected.any()
    assert out.metrics["rejected_repairs"].item() == 1.0
    assert out.metrics["repair_success_rate"].item() == 0.0
    assert out.metrics["repair_verified_rate"].item() == 0.5


def test_group_of_one_gets_zero():
    out = credit_ops.credit_assign(
        torch.ones(3, 4, dtype=torch.long),
        torch.tensor([4, 2, 3]),
        torch.tensor([2, 0, 0]),
        torch.tensor([0.0, 1.0, 0.0]),
        algorithm="dr_grpo",
    )
    torch.testing.assert_close(out.seq_advantages, torch.tensor([0.0, 0.5, -0.5]))
    torch.testing.assert_close(out.advantages[0], torch.zeros(4))
    torch.testing.assert_close(out.advantages[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("backend,device", PAIRS, ids=_ids(PAIRS))
def test_sign_guard_without_correct_samples(backend, device):
    # One group, all wrong: the repaired samples' shaped rewards rise above the mean, so A > 0 for them;
    # the sign guard must keep their masked credit <= 0, and without it the credit would be positive.
    tokens = torch.tensor([[1, 2, 3, 4, 5]] * 4, device=device)
    lengths = torch.full((4,), 5, device=device)
    rt = torch.tensor([[1, 2, 9, 4, 5], [1, 2, 3, 4, 7], [0, 0, 0, 0, 0]], device=device)
    args = (
        tokens,
        lengths,
        torch.zeros(4, dtype=torch.long, device=device),
        torch.zeros(4, device=device),
        rt,
        torch.tensor([5, 5, 5], device=device),
        torch.tensor([0, 1, 2], device=device),
        torch.tensor([True, True, False], device=device),
    )
    with credit_ops.use_backend(backend):
        out = credit_ops.credit_assign(*args)
        unguarded = credit_ops.credit_assign(*args, sign_guard=False)
    assert out.has_repair.tolist() == [True, True, False, False]
    assert (out.seq_advantages[:2] > 0).all()
    assert (out.advantages[:2] <= 0).all() and torch.equal(out.advantages[:2], torch.zeros_like(out.advantages[:2]))
    assert (unguarded.advantages[:2].max(1).values > 0).all()
    assert (out.repair_advantages[:2].sum(1) > 0).all()  # the repairs themselves are still reinforced


def test_closest_accepted_repair_is_chosen():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    rt = torch.tensor([[1, 9, 9, 4, 5, 6], [1, 2, 9, 4, 5, 6], [1, 2, 3, 4, 5, 8], [1, 9, 3, 4, 5, 6]])
    out = credit_ops.credit_assign(
        tokens,
        torch.tensor([6]),
        torch.tensor([0]),
        torch.tensor([0.0]),
        rt,
        torch.full((4,), 6),
        torch.zeros(4, dtype=torch.long),
        torch.tensor([True, False, True, True]),
    )
    # row 1 is closest (distance 1) but unverified; rows 2 and 3 tie at distance 1: the lower index wins
    assert out.repair_index.tolist() == [2]
    assert out.repair_selected.tolist() == [False, False, True, False]
    assert out.repair_accepted.tolist() == [True, False, True, True]
    assert out.masks.tolist() == [[False, False, False, False, False, True]]


def test_edit_ratio_rule():
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    rt = torch.tensor([[1, 7, 8, 4], [1, 7, 8, 9]])  # distance 2 (ratio 0.5: accepted), 3 (0.75: rejected)
    args = (
        tokens,
        torch.tensor([4, 4]),
        torch.tensor([0, 1]),
        torch.tensor([0.0, 0.0]),
        rt,
        torch.tensor([4, 4]),
        torch.tensor([0, 1]),
        torch.tensor([True, True]),
    )
    out = credit_ops.credit_assign(*args)
    assert out.repair_accepted.tolist() == [True, False] and out.has_repair.tolist() == [True, False]
    assert out.metrics["rejected_repairs"].item() == 1.0
    assert out.repair_distance.tolist() == [2, 3]
    strict = credit_ops.credit_assign(*args, max_edit_ratio=0.4)
    assert strict.repair_accepted.tolist() == [False, False] and strict.metrics["rejected_repairs"].item() == 2.0


def test_repairs_of_correct_samples_are_ignored():
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    out = credit_ops.credit_assign(
        tokens,
        torch.tensor([4, 4]),
        torch.tensor([0, 0]),
        torch.tensor([1.0, 0.0]),
        tokens[[0]] + 1,
        torch.tensor([4]),
        torch.tensor([0]),
        torch.tensor([True]),
    )
    assert not out.has_repair.any() and not out.repair_selected.any()
    assert out.metrics["repair_verified_rate"].item() == 0.0


def _nan_reward(b):
    return b["rewards"].clone().index_fill_(0, torch.tensor([1]), math.nan)


def _repair_of_n(b):
    return b["repair_of"].clone().index_fill_(0, torch.tensor([0]), b["tokens"].shape[0])


@pytest.mark.parametrize(
    "match,change",
    [
        pytest.param("rewards must have shape", lambda b: dict(rewards=b["rewards"][:-1]), id="rewards_wrong_shape"),
        pytest.param("lengths must have shape", lambda b: dict(lengths=b["lengths"][:-1]), id="lengths_wrong_shape"),
        pytest.param("lengths must lie in", lambda b: dict(lengths=b["lengths"] + 100), id="length_beyond_T"),
        pytest.param("rewards must be finite", lambda b: dict(rewards=_nan_reward(b)), id="nan_reward"),
        pytest.param(
            "repair_of must name an existing sample", lambda b: dict(repair_of=_repair_of_n(b)), id="repair_of_beyond_n"
        ),
        pytest.param(
            "repair_correct must have shape",
            lambda b: dict(repair_correct=b["repair_correct"][:-1]),
            id="repair_correct_wrong_shape",
        ),
        pytest.param(
            "repair_lengths must lie in",
            lambda b: dict(repair_lengths=b["repair_lengths"] + 100),
            id="repair_length_beyond_T",
        ),
        pytest.param("must be given together", lambda b: dict(repair_of=None), id="repairs_without_repair_of"),
        pytest.param("algorithm must be one of", lambda b: dict(algorithm="ppo"), id="unknown_algorithm"),
        pytest.param("needs delimiter_ids", lambda b: dict(granularity="step"), id="steps_without_delimiters"),
        pytest.param(
            "group_ids must lie in",
            lambda b: dict(group_ids=b["group_ids"] + b["tokens"].shape[0]),
            id="group_id_beyond_n",
        ),
        pytest.param(
            "prompt_lengths must lie in",
            lambda b: dict(prompt_lengths=b["lengths"] + 1),
            id="prompt_longer_than_sample",
        ),
        pytest.param(
            "all tensors must be on one device",
            lambda b: dict(rewards=b["rewards"].to("meta")),
            id="rewards_on_another_device",
        ),
    ],
)
def test_bad_input(match, change):
    b = rollout_batch()
    with pytest.raises(ValueError, match=match):
        credit_ops.credit_assign(**{**b, **change(b)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["ibpo", "grpo"])
def test_cuda_graph_capture(algorithm):
    batch = rollout_batch(n_groups=16, max_size=8, T=64, device="cuda", prompt=True, seed=3)
    kw = dict(algorithm=algorithm, granularity="step", delimiter_ids=torch.tensor([DELIM], device="cuda"), k=2)
    eager = credit_ops.credit_assign(**batch, **kw)
    static = {k: v.clone() for k, v in batch.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph (allocator, lazy init)
        credit_ops.credit_assign(**static, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = credit_ops.credit_assign(**static, **kw)
    other = rollout_batch(n_groups=16, max_size=8, T=64, device="cuda", prompt=True, seed=3)
    other["rewards"] = 1.0 - other["rewards"]
    for name, x in other.items():
        static[name].copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    want = credit_ops.credit_assign(**other, **kw)
    for name in FIELDS:
        torch.testing.assert_close(getattr(captured, name), getattr(want, name), msg=name)
    assert not torch.equal(want.seq_advantages, eager.seq_advantages)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_large():
    batch = rollout_batch(n_groups=64, max_size=16, T=96, device="cuda", prompt=True, seed=5)
    for algorithm in ("grpo", "ibpo", "iop"):
        out = credit_ops.credit_assign(**batch, algorithm=algorithm, k=3)
        ref = credit_ops.credit_assign(**{k: v.cpu() for k, v in batch.items()}, algorithm=algorithm, k=3)
        for name in FIELDS:
            got, want = getattr(out, name), getattr(ref, name)
            if got is not None:
                torch.testing.assert_close(got.cpu(), want, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["ibpo", "iop", "grpo"])
def test_cuda_no_host_sync(algorithm):
    batch = rollout_batch(n_groups=8, max_size=6, T=40, device="cuda", prompt=True, seed=11)
    credit_ops.credit_assign(**batch, algorithm=algorithm)  # warm-up: lazy initialisation may synchronise
    previous = credit_ops.set_value_checks("async")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = credit_ops.credit_assign(**batch, algorithm=algorithm, k=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        credit_ops.set_value_checks(previous)
    assert out.advantages.is_cuda


def test_per_sample_k():
    batch = rollout_batch(n_groups=5, prompt=True, seed=4)
    N = batch["tokens"].shape[0]
    as_int = credit_ops.credit_assign(**batch, k=1)
    as_tensor = credit_ops.credit_assign(**batch, k=torch.ones(N, dtype=torch.long))
    for name in FIELDS:
        torch.testing.assert_close(getattr(as_tensor, name), getattr(as_int, name), msg=name)
    k = torch.ones(N, dtype=torch.long)
    repaired = as_int.has_repair.nonzero().flatten()
    assert repaired.numel() > 0
    k[repaired[0]] = 0
    out = credit_ops.credit_assign(**batch, k=k)
    assert not out.masks[repaired[0]].any() and not out.gates[repaired[0]].any()
    assert not out.repair_gates[out.repair_index[repaired[0]]].any()
    with pytest.raises(ValueError, match="k must be a 0-d tensor or"):
        credit_ops.credit_assign(**batch, k=k[:-1])
    with pytest.raises(ValueError, match="k must be >= 0"):
        credit_ops.credit_assign(**batch, k=-k)
    with pytest.raises(ValueError, match="k must be None"):
        credit_ops.credit_assign(**batch, k=1.5)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    batch = rollout_batch(prompt=True)
    compiled = torch.compile(lambda b: credit_ops.credit_assign(**b, k=2), fullgraph=True)
    out, want = compiled(batch), credit_ops.credit_assign(**batch, k=2)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), msg=name)


def test_empty_batches():
    empty = credit_ops.credit_assign(
        torch.zeros(0, 5, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
    )
    assert empty.advantages.shape == (0, 5) and all(v.item() == 0 for v in empty.metrics.values())
    no_repairs = credit_ops.credit_assign(
        torch.zeros(2, 5, dtype=torch.long),
        torch.tensor([5, 3]),
        torch.tensor([0, 0]),
        torch.tensor([0.0, 1.0]),
        torch.zeros(0, 5, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
    )
    assert no_repairs.repair_advantages.shape == (0, 5) and not no_repairs.has_repair.any()
    assert no_repairs.gates.sum().item() == 8.0


def test_threshold_compared_in_float64():
    # 0.7 is not a float32: a reward of float32(0.7) lies just below the float64 threshold 0.7, so it is wrong,
    # for the masks and for the shaping alike.
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    out = credit_ops.credit_assign(
        tokens,
        torch.tensor([4, 4]),
        torch.tensor([0, 0]),
        torch.tensor([0.7, 1.0]),
        torch.tensor([[1, 2, 9, 4]]),
        torch.tensor([4]),
        torch.tensor([0]),
        torch.tensor([True]),
        threshold=0.7,
    )
    assert out.wrong.tolist() == [True, False] and out.has_repair.tolist() == [True, False]
    assert out.phi[0].item() == 0.5
