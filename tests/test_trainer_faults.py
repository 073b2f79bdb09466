"""Fault tolerance of credit_ops.trainer (issue 16): atomic, verified checkpoints with retention; non-finite steps
skipped and bounded; whole-line JSONL logs; a run SIGKILLed at any phase resumes to the uninterrupted run's
result; dataset and report errors as one clear message."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from credit_ops.trainer.config import ConfigError, load_config
from credit_ops.trainer.report import append_jsonl, read_jsonl

from tests.test_trainer import ROOT, TINY, read_metrics, run, weights

ARGS = ["algo=ibpo", "steps=4", "save_every=1", "eval_every=2", "log_samples_every=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm"))


def drop_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def assert_same_run(got_dir, want_dir, step=4):
    assert drop_time(read_metrics(got_dir)) == drop_time(read_metrics(want_dir))
    assert read_jsonl(os.path.join(got_dir, "samples.jsonl")) == read_jsonl(os.path.join(want_dir, "samples.jsonl"))
    got, want = weights(got_dir, step), weights(want_dir, step)
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


# ---- logs
def test_jsonl_logs_drop_a_torn_last_line(tmp_path):
    path = str(tmp_path / "m.jsonl")
    for s in (1, 2):
        append_jsonl(path, {"step": s})
    with open(path, "a") as f:
        f.write('{"step": 3, "rew')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with open(path, "a") as f:
        f.write("\n" + json.dumps({"step": 4}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:3"):  # a bad line in the middle is an error, not dropped
        read_jsonl(path)


# ---- checkpoints
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, cache):
    """A truncated newest checkpoint (the SafetensorError of issue 16) and a half-written one (no
    trainer_state.json) are skipped with a warning; resume=auto falls back to the previous good one and the
    run ends as the uninterrupted one did. An explicitly named bad checkpoint is a clear error."""
    run(tmp_path, cache, *ARGS, name="full")
    shutil.copytree(tmp_path / "full", tmp_path / "bad")
    ck = tmp_path / "bad" / "checkpoints"
    st = ck / "step_4" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    os.remove(ck / "step_3" / "trainer_state.json")
    with pytest.warns(UserWarning, match="skipping checkpoint") as rec:
        run(tmp_path, cache, *ARGS, "resume=auto", name="bad")
    msgs = " ".join(str(w.message) for w in rec)
    assert "step_4" in msgs and "step_3" in msgs
    assert_same_run(tmp_path / "bad", tmp_path / "full")
    st.write_bytes(data[:100])
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        run(tmp_path, cache, *ARGS, f"resume={ck / 'step_4'}", name="bad")


def test_keep_checkpoints_retains_the_newest(tmp_path, cache):
    run(tmp_path, cache, *ARGS, "keep_checkpoints=2", name="keep")
    assert sorted(os.listdir(tmp_path / "keep" / "checkpoints")) == ["step_3", "step_4"]
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_config(["keep_checkpoints=-1"])


# ---- run directories
def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_existing_run_is_never_mixed_into(tmp_path, cache, capsys):
    """Without resume, a run directory that holds files is refused (one line, exit 2, nothing touched);
    overwrite=true replaces it as a whole; resume=auto continues it."""
    from credit_ops.trainer.__main__ import main

    args = ["algo=grpo", "steps=2", "report=false", "eval_every=0"]
    run(tmp_path, cache, *args, name="r")
    d = tmp_path / "r"
    (d / "notes.txt").write_text("mine")
    before = _tree(d)
    with pytest.raises(ConfigError, match="already holds a run.*resume=auto.*overwrite=true"):
        run(tmp_path, cache, *args, "seed=1", name="r")
    cli = [*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", "name=r", *args]
    assert main(cli) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overwrite=true" in err and "Traceback" not in err
    assert _tree(d) == before  # nothing written, nothing lost
    run(tmp_path, cache, *args, "resume=auto", name="r")  # continuing is not mixing: allowed
    _, _, rows = run(tmp_path, cache, *args, "seed=1", "overwrite=true", name="r")
    assert not (d / "notes.txt").exists() and [r["step"] for r in rows] == [1, 2]
    (tmp_path / "empty").mkdir()  # an empty directory holds no run
    run(tmp_path, cache, *args, name="empty")


def test_experiment_refuses_an_earlier_experiment(tmp_path, capsys):
    from credit_ops.trainer.experiment import main

    out = tmp_path / "exp"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main([f"out={out}", "seeds=1"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert main([f"out={out}", "overwrite=maybe"]) == 2
    assert (out / "results.json").read_text() == "{}"


# ---- non-finite steps
def _nan_at(monkeypatch, steps):
    """policy_loss returns a NaN loss on the given (1-based) steps: one call per step (one epoch, no micro-batches)."""
    import credit_ops.trainer.train as train_mod

    real, calls = train_mod.policy_loss, [0]

    def fake(*a, **kw):
        calls[0] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan") if calls[0] in steps else loss), stats

    monkeypatch.setattr(train_mod, "policy_loss", fake)


def _optimizer_state(run_dir, step):
    return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step}", "optimizer.bin"), weights_only=True)


def test_nonfinite_step_is_skipped(tmp_path, cache, monkeypatch):
    _nan_at(monkeypatch, {2})
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        _, _, rows = run(tmp_path, cache, *ARGS, "steps=3", name="nan")
    d = tmp_path / "nan"
    assert [r["step_skipped"] for r in rows] == [0, 1, 0] and [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(v == v for v in (rows[2]["grad_norm"], rows[2]["grad_norm_var"]))  # NaN does not leak into later steps
    w1, w2, w3 = (weights(d, s) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # no update at step 2
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # step 3 trained
    o1, o2 = _optimizer_state(d, 1), _optimizer_state(d, 2)
    for i, s in o1["state"].items():  # optimizer state untouched (no AdamW step, moments unchanged)
        for key, v in s.items():
            assert torch.equal(v, o2["state"][i][key]), key


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint(tmp_path, cache, monkeypatch):
    from credit_ops.trainer.train import NonFiniteError

    _nan_at(monkeypatch, {2, 3, 4, 5, 6})
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError, match="2 consecutive steps"):
        run(tmp_path, cache, "algo=ibpo", "steps=6", "save_every=2", "max_skipped_steps=2", name="stop")
    d = tmp_path / "stop"
    assert [r["step_skipped"] for r in read_metrics(d)] == [0, 1, 1]
    w2, w3 = weights(d, 2), weights(d, 3)  # the stop's checkpoint: the last good step's weights
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    with open(d / "metrics.jsonl", "rb") as f:
        assert f.read().endswith(b"\n")
    monkeypatch.undo()  # the cause fixed, the run resumes from the stop's checkpoint
    _, summary, rows = run(tmp_path, cache, "algo=ibpo", "steps=6", "save_every=2", "resume=auto", name="stop")
    assert summary["steps"] == 6 and [r["step_skipped"] for r in rows] == [0, 1, 1, 0, 0, 0]


# ---- SIGKILL at every phase, then resume=auto
KILLS = ["rollout:1", "rollout:3", "revise:2", "update:4", "metrics:3", "checkpoint:2", "checkpoint:4"]


def test_killed_runs_resume_exactly(tmp_path, cache):
    """SIGKILLed during the rollout, the revision, the optimizer step, while writing a metrics line or a
    checkpoint, then restarted with resume=auto: the metrics, samples and final weights are the uninterrupted
    run's."""
    run(tmp_path, cache, *ARGS, "keep_checkpoints=2", name="full")  # also fills the warm-start cache
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    base = [*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", *ARGS, "keep_checkpoints=2"]
    procs = {}
    for at in KILLS:  # concurrently: each is mostly interpreter start-up
        name = "k_" + at.replace(":", "_")
        cmd = [sys.executable, "-m", "credit_ops.trainer", *base, f"name={name}"]
        procs[at] = (
            name,
            subprocess.Popen(
                cmd,
                env=dict(env, CREDIT_OPS_TEST_KILL_AT=at),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    for at, (_, p) in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, f"{at}: rc {p.returncode}\n{err[-2000:]}"
    with pytest.warns(UserWarning, match="torn"):  # the killed metrics line is torn: dropped on read
        assert [r["step"] for r in read_jsonl(tmp_path / "k_metrics_3" / "metrics.jsonl")] == [1, 2]
    assert any(d.startswith(".tmp_") for d in os.listdir(tmp_path / "k_checkpoint_2" / "checkpoints"))
    assert not os.path.exists(tmp_path / "k_rollout_1" / "checkpoints")  # killed before any checkpoint
    for at, (name, _) in procs.items():
        run(tmp_path, cache, *ARGS, "keep_checkpoints=2", "resume=auto", name=name)
        assert_same_run(tmp_path / name, tmp_path / "full")
        assert sorted(os.listdir(tmp_path / name / "checkpoints")) == ["step_3", "step_4"], at


def test_runs_killed_at_random_times_resume_exactly(tmp_path, cache):
    """SIGKILLed from outside at random moments (seeded; uniform over the run's training time, two kills per run,
    each resumed with resume=auto and then killed again) and finally run to the end: the uninterrupted run's
    metrics, samples and weights. Kills that land after the run ended are no kill; most must land inside."""
    import random
    import time

    run(tmp_path, cache, *ARGS, name="full")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    base = [*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", *ARGS, "resume=auto"]

    def start(name):
        cmd = [sys.executable, "-m", "credit_ops.trainer", *base, f"name={name}"]
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # the training time of one process: from its run directory's config.json to its exit
    p = start("timing")
    while not os.path.exists(tmp_path / "timing" / "config.json") and p.poll() is None:
        time.sleep(0.02)
    began = time.monotonic()
    p.communicate(timeout=300)
    assert p.returncode == 0
    span = time.monotonic() - began
    rng, landed = random.Random(16), 0
    for r in range(3):
        name = f"rand_{r}"
        for _ in range(2):
            p = start(name)
            while not os.path.exists(tmp_path / name / "config.json") and p.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, span))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                landed += 1
            p.communicate(timeout=300)
        run(tmp_path, cache, *ARGS, "resume=auto", name=name)
        assert_same_run(tmp_path / name, tmp_path / "full")
    assert landed >= 4, f"only {landed} of 6 kills landed inside a run ({span:.1f} s of training)"


# ---- dataset and report errors
BAD_ROWS = {
    "not-json": ('{"prompt": "1+1=", "answer": ', "not valid JSON"),
    "no-answer": ('{"prompt": "1+1="}', "missing field 'answer'"),
    "steps-a-string": ('{"prompt": "1+1=", "answer": "2", "steps": "1+1=2"}', "field 'steps'"),
    "prompt-a-number": ('{"prompt": 3, "answer": "2"}', "field 'prompt'"),
}


@pytest.mark.parametrize("line, message", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_dataset_rows_are_config_errors(tmp_path, capsys, line, message):
    from credit_ops.trainer.__main__ import main

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+2=", "answer": "3", "steps": ["1+2=3"]}\n\n' + line + "\n")
    with pytest.raises(ConfigError, match=f"{path}:3: {message}"):
        load_config(["task.name=jsonl", f"task.path={path}", "algo=grpo"])
    assert main(["task.name=jsonl", f"task.path={path}", "algo=grpo"]) == 2  # before any model is built
    assert f"data.jsonl:3: {message}" in capsys.readouterr().err


def test_oracle_without_steps_is_refused(tmp_path, capsys):
    """A JSONL dataset whose rows lack steps cannot give oracle repairs: refused up front, never trained as GRPO."""
    from credit_ops.trainer.__main__ import main

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+2=", "answer": "3", "steps": ["1+2=3"]}\n{"prompt": "2+2=", "answer": "4"}\n')
    args = ["task.name=jsonl", f"task.path={path}", "algo=diff_feedback", "revise.reviser=oracle"]
    with pytest.raises(ConfigError, match="1 of the 2 rows .* have none .*plain GRPO"):
        load_config(args)
    assert main(args) == 2 and "revise.reviser=policy" in capsys.readouterr().err
    load_config([*args[:2], "algo=grpo", "revise.reviser=oracle"])  # a baseline makes no repairs: fine
    load_config([*args[:3], "revise.reviser=policy"])


def test_report_of_a_missing_run_is_one_line(capsys):
    from credit_ops.trainer.report import main

    assert main(["runs/does_not_exist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["seeds=abc"], "seeds must be int"),
        (["workers=0"], "workers must be >= 1"),
        (["--bogus"], "cannot parse argument"),
        (["algo=nope"], "unknown algo"),
    ],
    ids=["bad_int", "zero_workers", "not_key_value", "unknown_algo"],
)
def test_experiment_bad_arguments_are_one_line(capsys, tmp_path, argv, match):
    """Bad experiment options and bad trainer keys fail with one line before any run starts (nothing written)."""
    from credit_ops.trainer.experiment import main

    out = tmp_path / "exp"
    assert main([*argv, f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()
