"""End-to-end tests of credit_ops.trainer on the embedded tiny model (CPU, a few steps each)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from credit_ops.trainer.config import ALGOS, ConfigError, load_config
from credit_ops.trainer.rewards import Verifier
from credit_ops.trainer.tasks import ArithTask, JsonlTask, Problem, extract_answer, oracle_repair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and run small enough for a few seconds per run; the warm start is shared through one cache.
TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "warm_start.steps=30",
    "warm_start.batch_size=32",
    "task.max_value=9",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "threads=1",
    "progress=false",
    "report=false",
    "eval_prompts=8",
    "credit.max_edit_ratio=1.0",  # the barely warm model rewrites a lot: accept every verified repair
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm"))


def run(tmp_path, cache, *args, name="run"):
    from credit_ops.trainer.train import train

    cfg = load_config([*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", f"name={name}", *args])
    summary = train(cfg)
    return cfg, summary, read_metrics(os.path.join(tmp_path, name))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- pieces
def test_char_tokenizer_round_trip():
    from credit_ops.trainer.modeling import char_tokenizer

    tok = char_tokenizer()
    text = "37+8=45;45-12=33;#33"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_arith_task_is_seeded_and_checkable():
    task = ArithTask(n_terms=3, max_value=15)
    a = task.sample(5, torch.Generator().manual_seed(3))
    b = task.sample(5, torch.Generator().manual_seed(3))
    assert [p.prompt for p in a] == [p.prompt for p in b]
    for p in a:
        assert task.score(p, p.solution) == 1.0
        assert eval(p.prompt.rstrip("=")) == int(p.answer)


def test_oracle_repair_keeps_correct_prefix():
    p = Problem("3+4-2=", "5", ["3+4=7", "7-2=5"])
    assert oracle_repair(p, "3+4=8;8-2=6;#6") == "3+4=7;7-2=5;#5"
    assert oracle_repair(p, "3+4=7;7-2=4;#4") == "3+4=7;7-2=5;#5"
    assert oracle_repair(p, "3+4=7;7-2=5;#5") is None


def test_verifiers():
    task = ArithTask()
    p = Problem("x", "0.5")
    assert extract_answer("so #### 42") == "42"
    assert Verifier("exact", task)(Problem("x", "42"), "#42") == 1.0
    assert Verifier("numeric", task)(p, "#0.50") == 1.0
    assert Verifier("numeric", task)(p, "#0.6") == 0.0
    assert Verifier("math_verify", task)(p, "the answer is $\\frac{1}{2}$") == 1.0


# ---- config errors, before any heavy work
@pytest.mark.parametrize(
    "args, message",
    [
        (["algo=ppo"], "unknown algo"),
        (["task.name=jsonl", "task.path=/nonexistent.jsonl"], "does not exist"),
        (["model.path=/nonexistent/model"], "does not exist"),
        (["rollout.group_size=1"], "group_size"),
        (["model.d_model=30", "model.n_head=4"], "divisible"),
        (["rollout.max_new_tokens=4"], "too short"),
        (["no_such_key=1"], "unknown config key"),
        (["optim.lr=fast"], "must be a number"),
    ],
)
def test_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_config_error_cli_exits_before_training(capsys):
    from credit_ops.trainer.__main__ import main

    assert main(["algo=nope"]) == 2
    assert "unknown algo" in capsys.readouterr().err


def test_yaml_configs_load():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".yaml") and "smollm2" not in name:
            load_config(["--config", os.path.join(ROOT, "configs", name)])


# ---- end to end
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_runs(tmp_path, cache, algo):
    cfg, summary, rows = run(tmp_path, cache, f"algo={algo}", "steps=2", name=algo)
    assert len(rows) == 2 and summary["steps"] == 2
    for r in rows:
        for key in (
            "reward",
            "accuracy",
            "repair_success",
            "active_tokens",
            "entropy",
            "grad_norm",
            "generated_tokens",
        ):
            assert key in r and r[key] == r[key], key  # present and not NaN
    assert rows[-1]["generated_tokens"] > rows[0]["generated_tokens"] > 0
    if cfg.uses_repairs:
        assert any(r["repair_rows"] > 0 for r in rows) or all(r["accuracy"] == 1.0 for r in rows)


@pytest.mark.parametrize(
    "args",
    [
        ["algo=diff_feedback", "credit.granularity=step"],
        ["algo=iop", "revise.verified_truncation=true"],
        ["algo=ibpo", "revise.reviser=policy", "revise.max_new_tokens=8"],
        ["algo=ibpo", "loss.fused=true", "loss.beta=0.01", "optim.micro_batch_size=3", "optim.ppo_epochs=2"],
    ],
    ids=["df-step", "iop-truncation", "policy-reviser", "fused-kl-accum"],
)
def test_variants_run(tmp_path, cache, args):
    _, _, rows = run(tmp_path, cache, *args, "steps=2")
    assert len(rows) == 2


def test_jsonl_task(tmp_path, cache):
    path = tmp_path / "data.jsonl"
    task = ArithTask(3, 9)
    with open(path, "w") as f:
        for p in task.sample(20, torch.Generator().manual_seed(0)):
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "steps": p.steps}) + "\n")
    assert JsonlTask(str(path)).checkable
    _, _, rows = run(tmp_path, cache, "task.name=jsonl", f"task.path={path}", "algo=diff_feedback", "steps=2")
    assert len(rows) == 2


def test_resume_is_exact(tmp_path, cache):
    from safetensors.torch import load_file

    args = ["algo=ibpo", "steps=4", "eval_every=2"]
    _, _, full = run(tmp_path, cache, *args, name="full")
    _, _, first = run(tmp_path, cache, *args, "stop_after=2", name="split")
    assert len(first) == 2
    _, _, resumed = run(tmp_path, cache, *args, "resume=auto", name="split")
    assert len(resumed) == 4
    drop = ("time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in full] == [
        {k: v for k, v in r.items() if k not in drop} for r in resumed
    ]
    a = load_file(os.path.join(tmp_path, "full", "checkpoints", "step_4", "model.safetensors"))
    b = load_file(os.path.join(tmp_path, "split", "checkpoints", "step_4", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_report_and_plots(tmp_path, cache):
    run(tmp_path, cache, "algo=ibpo", "steps=3", "report=true", "log_samples_every=1", "eval_every=2", name="rep")
    d = os.path.join(tmp_path, "rep")
    for name in ("reward", "accuracy", "repair_success", "active_tokens", "entropy", "grad_norm", "grad_norm_var"):
        assert os.path.getsize(os.path.join(d, f"{name}.png")) > 1000, name
    page = open(os.path.join(d, "report.html")).read()
    assert page.count("<img") >= 7
    assert 'class="tok"' in page and "repair of" in page


def test_two_process_accelerate_launch(tmp_path, cache):
    """DDP over gloo: `--multi_gpu` picks accelerate's torchrun launcher; without a GPU the trainer's
    Accelerator(cpu=True) makes it MULTI_CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU processes, also on a GPU box
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "credit_ops.trainer",
        *TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", "name=ddp", "algo=ibpo", "steps=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(os.path.join(tmp_path, "ddp"))
    assert len(rows) == 2 and rows[0]["processes"] == 2
    assert rows[0]["generated_tokens"] > 0


def test_local_model_dir_and_external_reviser(tmp_path, cache):
    """Any local HF model directory as the policy (model.path) and as an external reviser (revise.model_path)."""
    from credit_ops.trainer.modeling import char_tokenizer, tiny_model

    cfg = load_config([*TINY])
    tok = char_tokenizer()
    model_dir = tmp_path / "hf_model"
    tiny_model(cfg, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _, _, rows = run(
        tmp_path, cache, f"model.path={model_dir}", "algo=ibpo", "revise.reviser=external",
        f"revise.model_path={model_dir}", "revise.max_new_tokens=8", "steps=2",
    )  # fmt: skip
    assert len(rows) == 2
