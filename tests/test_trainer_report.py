"""Metrics and report: update()'s statistics do not depend on micro-batching; report.html (rendered from the
jinja2 template) shows the final held-out evaluation beside the initial one, integer steps, distinct first / last
columns, a legend line for every metric; a resumed run is reported as one run; checkpoints print no warning."""

import json
import logging
import os

import pytest
import torch
from credit_ops.trainer.config import load_config
from credit_ops.trainer.report import METRICS, _step_axis, _windows, write_report
from credit_ops.trainer.train import drop_tied_duplicates

from tests.test_trainer_update import N_ROWS, _accelerator, run_update, setup

TINY = [
    *("model.n_layer=1", "model.d_model=32", "model.n_head=2", "warm_start.steps=30", "warm_start.batch_size=32"),
    *("rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=24", "threads=1"),
    *("progress=false", "eval_prompts=8", "credit.max_edit_ratio=1.0", "log_samples_every=1", "eval_every=2"),
]


# ---- statistics: token-weighted, whatever the micro-batching
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "gated_gspo"])
def test_update_statistics_do_not_depend_on_micro_batches(loss_type):
    """The same numbers with micro-batches of 3 (3 + 3 + 2 rows) as with the whole batch, over 2 PPO epochs:
    means weighted by tokens (not means of per-micro-batch means), num_tokens the total of the rows."""
    out = {}
    for micro in (0, 3):  # the same model and rows each time (setup is seeded)
        args = ("optim.ppo_epochs=2", "optim.max_grad_norm=1e9", f"optim.micro_batch_size={micro}")
        cfg, model, batch, adv, gates, old, ref = setup(loss_type, *args)
        _, out[micro] = run_update(_accelerator(), cfg, model, batch, adv, gates, old, ref, lr=1e-2)
    whole, split = out[0], out[3]
    assert whole.keys() == split.keys() and {"num_tokens", "entropy_mean", "clip_frac", "ratio_mean"} <= whole.keys()
    assert whole["num_tokens"] == split["num_tokens"]
    if loss_type != "gated_gspo":  # the op's statistics cover every valid token
        assert whole["num_tokens"] == float(batch.valid.sum())
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7), k
    # the check can fail: the micro-batches' entropies differ, so their plain mean is not the token mean
    assert len(batch) == N_ROWS and batch.valid[:3].sum() != batch.valid[6:].sum()


# ---- the report of a hand-made run directory
def fake_run(d, steps):
    os.makedirs(d)
    rows = []
    for s in range(1, steps + 1):
        row = {k: 0.1 * s for k in METRICS if k not in ("eval_sampled_accuracy", "eval_shuffled_accuracy")}
        row.update(step=s, processes=1, generated_tokens=100 * s, time=2.0 * s, num_tokens=50 + s, mystery=1.0)
        rows.append(row)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = dict(steps=steps, generated_tokens=100 * steps, time=123.0, resumed_at=[2])
    summary.update(initial_eval_accuracy=0.125, initial_eval_sampled_accuracy=0.25)
    summary.update(eval_accuracy=0.875, eval_sampled_accuracy=0.75)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"algo": "ibpo", "seed": 0}, f)


def test_report_shows_final_evaluation_legend_and_distinct_columns(tmp_path):
    d = str(tmp_path / "r")
    fake_run(d, steps=3)
    page = open(write_report(d)).read()
    # the held-out evaluation before and after RL, from summary.json
    assert "before RL" in page and "after RL (step 3)" in page
    for v in ("0.125", "0.875", "0.250", "0.750"):
        assert f"<td>{v}</td>" in page, v
    # 3 steps: step 1 vs step 3, not the same 3 steps twice
    assert "<th>step 1</th><th>step 3</th>" in page and "first 10" not in page
    # a legend line for every metric the run logged (one the report does not know included), and only those
    for key in [*(k for k in METRICS if k != "eval_shuffled_accuracy"), "mystery"]:
        assert f"<dt>{key}</dt>" in page, key
    assert "<dt>eval_shuffled_accuracy</dt>" not in page and "<dt>step</dt>" not in page
    assert "one run over 2 sessions: resumed at step 2" in page and "123 s of RL" in page


def test_short_and_long_runs_compare_disjoint_steps():
    assert _windows(1) == (slice(0, 1), slice(0, 1))
    assert _windows(3) == (slice(0, 1), slice(2, 3))
    assert _windows(15) == (slice(0, 7), slice(8, 15))
    assert _windows(200) == (slice(0, 10), slice(190, 200))


def test_step_axes_have_integer_ticks():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ticks(integer):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [0.1, 0.2, 0.3])
        if integer:
            _step_axis(ax)
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        out = [t for t in ax.get_xticks() if lo <= t <= hi]
        plt.close(fig)
        return out

    assert any(t != int(t) for t in ticks(False))  # matplotlib's default: 1.0, 1.5, 2.0, ...
    assert ticks(True) and all(t == int(t) for t in ticks(True))


# ---- checkpoints of tied weights, silently and bit-identically
def test_checkpoint_of_tied_weights_is_silent_and_loads_bit_identically(tmp_path, caplog):
    from accelerate import Accelerator
    from credit_ops.trainer.modeling import char_tokenizer, tiny_model

    cfg = load_config(["model.n_layer=1", "model.d_model=32", "model.n_head=2"])
    torch.manual_seed(0)
    model = tiny_model(cfg, char_tokenizer())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    acc = Accelerator(cpu=True)
    model = acc.prepare(model)
    with caplog.at_level(logging.WARNING):
        acc.save_state(str(tmp_path / "plain"))
    assert "Removed shared tensor" in caplog.text  # accelerate's warning, which the trainer's hook avoids
    caplog.clear()
    acc.register_save_state_pre_hook(drop_tied_duplicates)
    with caplog.at_level(logging.WARNING):
        acc.save_state(str(tmp_path / "hooked"))
    assert "Removed shared tensor" not in caplog.text
    plain, hooked = (open(tmp_path / d / "model.safetensors", "rb").read() for d in ("plain", "hooked"))
    assert plain == hooked  # the same file
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    acc.load_state(str(tmp_path / "hooked"))
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


# ---- a resumed run is one run
def test_resumed_run_keeps_initial_evaluation_and_whole_time(tmp_path, caplog):
    from credit_ops.trainer.train import train

    args = [*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={tmp_path / 'cache'}", "name=r", "steps=3"]
    with caplog.at_level(logging.WARNING):
        first = train(load_config([*args, "save_every=1", "stop_after=2"]))
    assert "Removed shared tensor" not in caplog.text
    assert first["steps"] == 2 and "resumed_at" not in first
    second = train(load_config([*args, "resume=auto"]))
    assert second["steps"] == 3 and second["resumed_at"] == [2]
    for key in ("initial_eval_accuracy", "initial_eval_sampled_accuracy"):
        assert second[key] == first[key], key
    d = tmp_path / "r"
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert second["time"] >= rows[1]["time"] > 0 and rows[2]["time"] > rows[1]["time"]  # time over both sessions
    assert json.load(open(d / "summary.json")) == second
    page = open(d / "report.html").read()
    assert "resumed at step 2" in page and f"<td>{second['eval_accuracy']:.3f}</td>" in page
    # the run directory keeps the resolved configuration, readable by --config
    cfg = load_config(["--config", str(d / "config.yaml")])
    assert cfg.resume == "auto" and cfg.steps == 3 and cfg.run_dir == str(d)
