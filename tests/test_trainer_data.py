"""Held-out evaluation: the eval split is disjoint from every training draw by construction (tasks.Task.sample,
split="train" | "eval"), for the built-in arithmetic (a hash split of the problem space) and for JSONL datasets (a
hash split of the rows, or a separate task.eval_path); the eval set is fixed per seed and a resumed run replays
the same training data."""

import json
import os

import pytest
import torch
from credit_ops.trainer.config import ConfigError, load_config
from credit_ops.trainer.tasks import ArithTask, JsonlTask, Problem, build_task
from credit_ops.trainer.train import rollout_seeds

EVAL_SEED = 10**6  # train.evaluate's generator seed for run seed 0


def eval_set(task, n=64, seed=0):
    return task.sample(n, torch.Generator().manual_seed(EVAL_SEED + seed), split="eval")


def training_prompts(task, steps=200, per_step=16, seed=0, world=1):
    """Every prompt the rollout of a run of `steps` steps draws (train.py: the data seed of each step and rank)."""
    out = set()
    for step in range(steps):
        for rank in range(world):
            _, data_seed = rollout_seeds(seed, step, rank, world)
            out |= {p.prompt for p in task.sample(per_step, torch.Generator().manual_seed(data_seed), split="train")}
    return out


def test_arith_eval_prompts_never_train():
    """The default run's 200 steps x 16 prompts (the issue: 43 of 57 eval prompts were among them) and a warm
    start's worth of draws: none is an eval prompt; the eval set is 64 distinct prompts of the eval split."""
    task = build_task(load_config([]))
    held = eval_set(task)
    prompts = {p.prompt for p in held}
    assert len(held) == len(prompts) == 64 and all(task.split_of(p) == "eval" for p in held)
    seen = training_prompts(task)
    assert len(seen) > 1000 and not seen & prompts
    warm = task.sample(600 * 64 // 8, torch.Generator().manual_seed(7919))  # the warm start draws split="train"
    assert not {p.prompt for p in warm} & prompts
    # the split is a partition of the whole problem space: about eval_fraction of it, fixed by the prompt alone
    space = {task.draw(torch.Generator().manual_seed(i)).prompt for i in range(5000)}
    share = sum(task.split_of(Problem(p, "")) == "eval" for p in space) / len(space)
    assert 0.05 < share < 0.15 and len(space) > 2000


def test_arith_eval_set_is_fixed_per_seed_and_follows_the_fraction():
    task = ArithTask(3, 9, "+-", 0.3)
    assert [p.prompt for p in eval_set(task)] == [p.prompt for p in eval_set(ArithTask(3, 9, "+-", 0.3))]
    assert [p.prompt for p in eval_set(task, seed=1)] != [p.prompt for p in eval_set(task)]
    wide = ArithTask(3, 9, "+-", 0.3, eval_fraction=0.5)
    narrow_eval = {p.prompt for p in eval_set(task, n=40)}
    # a larger fraction holds out a superset of prompts (the same hash, a higher threshold)
    assert all(wide.split_of(Problem(p, "")) == "eval" for p in narrow_eval)
    # training draws are i.i.d. from the training split, seeded: the same generator seed, the same problems
    a = task.sample(8, torch.Generator().manual_seed(3))
    assert [p.prompt for p in a] == [p.prompt for p in task.sample(8, torch.Generator().manual_seed(3))]


def test_a_problem_space_too_small_to_split_is_an_error():
    tiny = ArithTask(2, 1, "+", eval_fraction=0.01)  # 4 prompts: 0+0, 0+1, 1+0, 1+1
    with pytest.raises(ValueError, match="too small for task.eval_fraction"):
        tiny.sample(4, torch.Generator().manual_seed(0), split="eval")
    with pytest.raises(ValueError, match="split must be one of"):
        tiny.sample(1, torch.Generator(), split="test")
    with pytest.raises(ConfigError, match="eval_fraction"):
        load_config(["task.eval_fraction=1.0"])


def write_jsonl(path, problems):
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "steps": p.steps}) + "\n")
    return str(path)


@pytest.fixture
def dataset(tmp_path):
    """200 rows of arithmetic, with repeated prompts (a prompt's rows all land in one split)."""
    return write_jsonl(tmp_path / "data.jsonl", ArithTask(3, 9).sample(200, torch.Generator().manual_seed(0)))


def test_jsonl_held_out_rows_never_train(dataset):
    task = JsonlTask(dataset, eval_fraction=0.2)
    distinct = {r.prompt for r in task.rows}
    held = {p.prompt for p in task.sample(1000, torch.Generator().manual_seed(EVAL_SEED), split="eval")}
    assert len(held) == len(task.eval_rows) == round(0.2 * len(distinct) + 0.4999)  # ceil
    seen = {p.prompt for p in task.sample(5000, torch.Generator().manual_seed(1))}
    assert not seen & held and seen | held == distinct  # every other prompt trains
    assert {r.prompt for r in task.train_rows} == distinct - held


def test_jsonl_eval_path_both_ways(tmp_path, dataset):
    """A separate eval file: its rows are the eval set, and training rows whose prompt is among them are left out
    (the eval file may overlap the training file); a training-only prompt never reaches evaluation."""
    train_rows = JsonlTask(dataset).rows
    extra = ArithTask(3, 9).sample(30, torch.Generator().manual_seed(99))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", train_rows[:20] + extra)  # 20 shared with the training file
    cfg = load_config(["task.name=jsonl", f"task.path={dataset}", f"task.eval_path={eval_file}"])
    task = build_task(cfg)
    held = {p.prompt for p in task.sample(1000, torch.Generator().manual_seed(EVAL_SEED), split="eval")}
    assert held == {p.prompt for p in train_rows[:20] + extra}
    seen = {p.prompt for p in task.sample(5000, torch.Generator().manual_seed(1))}
    assert not seen & held
    assert seen == {r.prompt for r in train_rows} - held  # the training file's other prompts all train
    with pytest.raises(ConfigError, match="task.eval_path"):
        load_config(["task.name=jsonl", f"task.path={dataset}", f"task.eval_path={tmp_path / 'missing.jsonl'}"])
    everything = write_jsonl(tmp_path / "all.jsonl", train_rows)
    with pytest.raises(ValueError, match="no training rows"):
        JsonlTask(dataset, eval_path=everything)


def test_reasoning_gym_rows_split():
    """The gsm8k task (reasoning-gym, optional) splits its generated questions like a JSONL file's rows."""
    pytest.importorskip("reasoning_gym")
    from credit_ops.trainer.tasks import ReasoningGymTask

    task = ReasoningGymTask("chain_sum", size=200, seed=0)
    held = {p.prompt for p in task.sample(100, torch.Generator().manual_seed(EVAL_SEED), split="eval")}
    seen = {p.prompt for p in task.sample(2000, torch.Generator().manual_seed(1))}
    assert held and not seen & held


def test_a_run_evaluates_on_held_out_prompts_and_resumes_exactly(tmp_path, monkeypatch):
    """In a run: every prompt the rollout trains on is a training-split prompt, every prompt evaluated is an eval
    one, the same eval set at every evaluation; a run resumed from step 2 trains on the same problems as the
    uninterrupted one."""
    from credit_ops.trainer import train as train_mod

    drawn = []  # (split, prompts) of every task.sample call the trainer makes
    real = train_mod.build_task

    def recording_task(cfg):
        task = real(cfg)
        sample = task.sample

        def sample_and_record(n, gen, split="train"):
            out = sample(n, gen, split=split)
            drawn.append((split, tuple(p.prompt for p in out)))
            return out

        task.sample = sample_and_record
        return task

    monkeypatch.setattr(train_mod, "build_task", recording_task)
    args = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "warm_start.steps=0", "rollout.prompts_per_step=4"]
    args += ["rollout.group_size=2", "rollout.max_new_tokens=24", "threads=1", "progress=false", "report=false"]
    args += ["eval_every=2", "eval_prompts=6", f"out_dir={tmp_path}", "algo=grpo", "steps=4", "log_samples_every=0"]

    def run(*extra):
        drawn.clear()
        train_mod.train(load_config([*args, *extra]))
        return list(drawn)

    full = run("name=full")
    rollouts = [p for s, p in full if s == "train"]
    evals = [p for s, p in full if s == "eval"]
    task = real(load_config(args))
    assert len(rollouts) == 4 and all(task.split_of(Problem(q, "")) == "train" for p in rollouts for q in p)
    assert len(evals) >= 3 and len(set(evals)) == 1 and len(evals[0]) == 6  # one fixed set of 6
    assert all(task.split_of(Problem(q, "")) == "eval" for q in evals[0])
    run("name=resumed", "stop_after=2", "save_every=2")
    resumed = run("name=resumed", "resume=auto")
    assert [p for s, p in resumed if s == "train"] == rollouts[2:]
    assert {p for s, p in resumed if s == "eval"} == set(evals)
    with open(os.path.join(tmp_path, "full", "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(tmp_path, "resumed", "summary.json")) as f:
        assert json.load(f)["eval_accuracy"] == summary["eval_accuracy"]
