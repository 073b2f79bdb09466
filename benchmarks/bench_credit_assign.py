"""credit_assign and the GRPO-family group statistics: credit_ops vs Python loops as RL frameworks write them.

GPU: 1024 groups x 16 samples x 2048 tokens (16,384 rows, 33.5M tokens); CPU: 64 x 16 x 512.
Half the samples are wrong; each wrong sample has one repair (three point substitutions, verified 80% of
the time). Baselines:
- ``loop``: reference.credit_assign, per-sample Python loops and verl's id2score dict for the group
  statistics, the same align_edits op for the diffs (no framework has one), one row op per sample;
- ``verl``: verl's compute_grpo_outcome_advantage (dict of score lists, per-sample loop, then the sequence
  advantage broadcast over the response mask), against credit_ops.group_advantages + token_advantages.

extra_info ``step_frac_<model>``: the median over the time of one training step (policy forward + backward,
6 * params * tokens FLOPs at 50% of the card's dense bf16 peak) for that model size; the target is < 1%.
"""

import pytest
import torch

import credit_ops
from benchmarks.conftest import DEVICE, measure, sync
from credit_ops import reference

if DEVICE == "cuda":
    GROUPS, SIZE, T = 1024, 16, 2048
else:
    GROUPS, SIZE, T = 64, 16, 512
N = GROUPS * SIZE
VOCAB = 151_936
MODELS = {"0.5B": 0.5e9, "7B": 7e9}


def _step_seconds(params: float) -> float:
    peak = 989e12 if DEVICE == "cuda" else 1e12  # H100/H200 dense bf16; CPU: a nominal 1 TFLOP/s
    return 6 * params * N * T / (0.5 * peak)


def rollout(seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (N, T), device=DEVICE, generator=g)
    lengths = torch.randint(T // 2, T + 1, (N,), device=DEVICE, generator=g)
    gid = torch.arange(GROUPS, device=DEVICE).repeat_interleave(SIZE)
    gid = gid[torch.randperm(N, device=DEVICE, generator=g)]  # unsorted, as after a shuffled rollout
    rewards = (torch.rand(N, device=DEVICE, generator=g) < 0.5).float()
    repair = tokens.clone()
    pos = (torch.rand(N, 3, device=DEVICE, generator=g) * lengths.unsqueeze(1)).long()
    repair.scatter_(1, pos, torch.randint(0, VOCAB, (N, 3), device=DEVICE, generator=g))
    repair_of = torch.where(rewards < 0.5, torch.arange(N, device=DEVICE), -1)
    correct = torch.rand(N, device=DEVICE, generator=g) < 0.8
    return dict(
        tokens=tokens,
        lengths=lengths,
        group_ids=gid,
        rewards=rewards,
        repair_tokens=repair,
        repair_lengths=lengths.clone(),
        repair_of=repair_of,
        repair_correct=correct,
    )


def verl_grpo_token_advantages(rewards, group_ids, response_mask, eps=1e-6):
    """verl's compute_grpo_outcome_advantage: group statistics from a dict of per-sample score lists."""
    from collections import defaultdict

    scores = rewards.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    index = group_ids.tolist()
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                s = torch.stack(id2score[idx])
                id2mean[idx], id2std[idx] = torch.mean(s), torch.std(s)
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
        return scores.unsqueeze(-1) * response_mask


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    return rollout()


def measure_once(benchmark, fn, **info):
    """The Python-loop baselines: seconds per call on the full batch, so one timed call, no warm-up."""

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(info, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")


def _info(benchmark):
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    median = benchmark.stats.stats.median
    info = {f"step_frac_{k}": round(median / _step_seconds(p), 5) for k, p in MODELS.items()}
    benchmark.extra_info.update(info)


@pytest.fixture
def async_checks():
    """Value checks as device-side asserts: the credit_ops calls run without a host synchronisation."""
    previous = credit_ops._checks._mode
    credit_ops.set_value_checks("async")
    yield
    credit_ops.set_value_checks(previous)


def _skip_without_align(algorithm):
    masked = algorithm != "grpo"
    if masked and DEVICE == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("credit::align_edits", "CUDA"):
            pytest.skip("credit::align_edits has no CUDA kernel in this build")


@pytest.mark.parametrize("algorithm", ["ibpo", "iop", "grpo"])
@pytest.mark.parametrize("impl", ["credit_ops", "loop"])
@torch.no_grad()
def test_credit_assign(benchmark, batch, async_checks, impl, algorithm):
    benchmark.group = f"credit_assign {algorithm} {GROUPS}x{SIZE}x{T}"
    _skip_without_align(algorithm)
    if impl == "credit_ops":
        measure(benchmark, lambda: credit_ops.credit_assign(**batch, algorithm=algorithm), impl=impl, rows=N)
    else:
        if DEVICE == "cuda" and algorithm != "ibpo":
            pytest.skip("on the GPU only ibpo's Python-loop baseline runs (tens of seconds per call)")
        kw = dict(algorithm=algorithm, align=credit_ops.align_edits)
        measure_once(benchmark, lambda: reference.credit_assign(**batch, **kw), impl=impl, rows=N)
    _info(benchmark)


@pytest.mark.parametrize("impl", ["credit_ops", "verl"])
@torch.no_grad()
def test_grpo_token_advantages(benchmark, batch, async_checks, impl):
    benchmark.group = f"grpo advantages {GROUPS}x{SIZE}x{T}"
    rewards, gid, lengths = batch["rewards"], batch["group_ids"], batch["lengths"]
    if impl == "credit_ops":
        no = torch.zeros(N, dtype=torch.bool, device=DEVICE)
        mask = torch.zeros(N, T, dtype=torch.bool, device=DEVICE)

        def fn():
            adv = credit_ops.group_advantages(rewards, gid, num_groups=GROUPS)
            return credit_ops.token_advantages(adv, mask, wrong=no, has_repair=no, lengths=lengths)

        measure(benchmark, fn, impl=impl, rows=N)
    else:
        response_mask = (torch.arange(T, device=DEVICE) < lengths.unsqueeze(1)).float()
        measure_once(benchmark, lambda: verl_grpo_token_advantages(rewards, gid, response_mask), impl=impl, rows=N)
    _info(benchmark)
