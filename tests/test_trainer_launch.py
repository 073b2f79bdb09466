"""Several processes: the documented commands run the processes they name, and the trainer says so when it runs
fewer than were asked for.

What "the same global batch" can mean exactly. Each process draws its own problems and samples its own
completions: at step s (0-based) rank r of W processes uses the data seed seed*7919 + s*W + r and the sampling seed
seed*1000003 + s*1009 + r (train.rollout_seeds). A 2-process run's global batch therefore holds data that no
single-process run draws in one step (and sampling a batch of 2B prompts in one process consumes the RNG
differently from two processes sampling B each), so end-to-end weights cannot be compared bit for bit. What is
exact, and tested here: both start from the same warm-started model and the same initial evaluation; rank 0's
rollout of step 1 is the single-process run's (same data and sampling seeds, same weights), so the logged sample
group of step 1 is identical; the counts are totals over the processes; and the update over a given global batch
applies the full-batch gradient (tests/test_trainer_update.py, 2 processes against one).
"""

import json
import os
import subprocess
import sys

import pytest
from credit_ops.trainer.launch import process_count_problem, requested_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, G = 2, 4  # prompts per step per process, samples per prompt
TINY = [
    *("model.n_layer=1", "model.d_model=32", "model.n_head=2", "warm_start.steps=30", "warm_start.batch_size=32"),
    *(f"rollout.prompts_per_step={B}", f"rollout.group_size={G}", "rollout.max_new_tokens=24", "threads=1"),
    *("progress=false", "report=false", "eval_prompts=8", "eval_every=0", "log_samples_every=1", "algo=grpo"),
]


# ---- what was asked for, read from the launcher
def test_requested_processes_from_the_launcher_its_config_or_world_size(tmp_path):
    args = ["--num_processes", "2", "--num_machines", "1", "-m", "credit_ops.trainer", "steps=3"]
    assert requested_processes(args, {}) == (2, "accelerate launch --num_processes 2")
    assert requested_processes(["--num-processes=4", "train.py"], {})[0] == 4
    # the trainer's own arguments are not the launcher's
    assert requested_processes(["-m", "credit_ops.trainer", "--num_processes", "3"], {"WORLD_SIZE": "1"})[0] == 1
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("distributed_type: MULTI_CPU\nnum_processes: 3\n")
    assert requested_processes(["--config_file", str(cfg), "-m", "x"], {})[0] == 3
    assert requested_processes(None, {"WORLD_SIZE": "2"}) == (2, "WORLD_SIZE=2")
    assert requested_processes(None, {}) is None


def test_process_count_problem_names_the_fix():
    why = process_count_problem(1, ["--num_processes", "2", "-m", "credit_ops.trainer"], {})
    assert "running 1 process but 2 were asked for" in why
    assert "accelerate launch --multi_gpu --num_processes 2" in why
    assert "torchrun --standalone --nproc_per_node 2" in why
    assert process_count_problem(2, ["--multi_gpu", "--num_processes", "2", "-m", "x"], {"WORLD_SIZE": "2"}) is None
    assert process_count_problem(1, [], {}) is None  # a plain run asks for nothing
    assert "--multi_gpu" not in process_count_problem(3, [], {"WORLD_SIZE": "2"})


# ---- end to end, on the CPU
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(directory, cache, env) shared by the runs of this module; a single-process run warms the cache first."""
    d = tmp_path_factory.mktemp("launch")
    # CPU processes, also on a GPU machine; no accelerate config file of the user's
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HOME=str(d / "hf"))
    return d, str(d / "cache"), env


def launch(runs, launcher, name, *args):
    d, cache, env = runs
    cmd = [
        *launcher,
        "-m",
        "credit_ops.trainer",
        *TINY,
        f"out_dir={d}",
        f"warm_start.cache_dir={cache}",
        f"name={name}",
    ]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(d / name / "metrics.jsonl")]
    samples = [json.loads(line) for line in open(d / name / "samples.jsonl")]
    summary = json.load(open(d / name / "summary.json"))
    return proc, rows, samples, summary


ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")
COMMON = ("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def test_two_processes_under_torchrun_against_one(runs):
    """`torchrun --standalone --nproc_per_node 2` (the --help's second form; test_trainer.py runs the
    `accelerate launch --multi_gpu` one): two processes over gloo, checked against a single-process run where
    they must agree exactly."""
    _, one, one_samples, one_summary = launch(runs, (sys.executable,), "one", "steps=2")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc, two, two_samples, two_summary = launch(runs, torchrun, "two", "steps=2")
    assert "were asked for" not in proc.stderr
    assert [r["processes"] for r in two] == [2, 2] and [r["processes"] for r in one] == [1, 1]
    # the same warm start, the same initial evaluation
    for key in ("initial_eval_accuracy", "initial_eval_sampled_accuracy"):
        assert two_summary[key] == one_summary[key], key
    # rank 0's step-1 rollout is the single-process run's: the logged group (tokens, rewards, advantages) agrees
    assert two_samples[0] == one_samples[0]
    # counts are totals over both processes: the rollouts' tokens, the loss's tokens (grpo: the samples')
    for r in two:
        assert r["num_tokens"] == pytest.approx(r["completion_len"] * B * G * 2)
    assert two[0]["generated_tokens"] == round(two[0]["completion_len"] * B * G * 2)
    assert one[0]["num_tokens"] == pytest.approx(one[0]["completion_len"] * B * G)


def test_accelerate_launch_without_multi_gpu_says_it_runs_one_process(runs):
    """accelerate's simple launcher (no --multi_gpu, no GPU) starts ONE process for --num_processes 2: the trainer
    runs it and says so, with the command that runs two."""
    launcher = (*ACCELERATE, "--num_processes", "2", *COMMON)
    proc, rows, _, _ = launch(runs, launcher, "simple", "steps=1")
    assert [r["processes"] for r in rows] == [1]
    assert "running 1 process but 2 were asked for (accelerate launch --num_processes 2)" in proc.stderr
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stderr
