"""Tests of credit_ops.trainer: its pieces, then end to end on the embedded tiny model (CPU, a few steps each).

The update step itself (gradient accumulation over micro-batches and processes, PPO epochs) is checked against
the op in tests/test_trainer_update.py.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from credit_ops.trainer import config as config_mod
from credit_ops.trainer.config import ALGOS, ConfigError, credit_algorithm, load_config
from credit_ops.trainer.loss import loss_settings
from credit_ops.trainer.rewards import Verifier
from credit_ops.trainer.tasks import ArithTask, JsonlTask, Problem, extract_answer, oracle_repair
from safetensors.torch import load_file

from credit_ops import reference as R

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
    "revise.reviser=oracle",  # the barely warm model cannot revise; the policy reviser has its own tests
    "warm_start.revision_batch_size=0",  # 30 steps teach the solutions only
    # the tests' own regime (the defaults are tuned for the 200-step embedded run): T = 1, no reference model
    "rollout.temperature=1.0",
    "loss.beta=0",
    "optim.lr=2e-4",
]
N = 2 * 4  # samples per step: prompts_per_step * group_size


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm"))


def run(tmp_path, cache, *args, name="run"):
    from credit_ops.trainer.train import train

    cfg = load_config([*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", f"name={name}", *args])
    summary = train(cfg)
    return cfg, summary, read_metrics(os.path.join(tmp_path, name))


def read_metrics(run_dir):
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def rollout_tokens(row):
    """Tokens the rollout of a step generated: its mean completion length (over all processes) times N."""
    return round(row["completion_len"] * N * row["processes"])


def weights(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step}", "model.safetensors"))


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


def test_trainer_uses_the_ops_tables():
    """The algorithms, loss types and loss defaults are credit_ops.reference's, not copies."""
    from credit_ops.trainer import loss

    assert loss.DEFAULT_AGG is R.DEFAULT_AGG and loss.DEFAULT_EPS is R.DEFAULT_EPS
    assert config_mod.LOSS_TYPES is R.LOSS_TYPES
    assert set(ALGOS) == set(R.ALGORITHMS) | {"gspo"} and len(ALGOS) == len(set(ALGOS))
    # each algorithm's default loss, as before the tables moved: the credit methods share DAPO's, IOP has its own
    assert config_mod.DEFAULT_LOSS == dict(
        grpo="grpo", dapo="dapo", dr_grpo="dr_grpo", gspo="gspo", ibpo="dapo", diff_feedback="dapo", iop="gated_gspo"
    )
    for algo in ALGOS:
        cfg = load_config([f"algo={algo}"])
        spec = R.ALGORITHMS[credit_algorithm(algo)]
        assert cfg.uses_repairs == spec["masks"], algo
        s = loss_settings(cfg)
        assert (s["eps_low"], s["eps_high"]) == R.DEFAULT_EPS[cfg.loss_type]
        assert s["agg"] == R.DEFAULT_AGG[cfg.loss_type]
    s = loss_settings(load_config(["loss.eps_low=0.1", "loss.eps_high=0.3", "loss.agg=seq_mean_token_sum"]))
    assert (s["eps_low"], s["eps_high"], s["agg"]) == (0.1, 0.3, "seq_mean_token_sum")


# ---- config errors, before any heavy work
CONFIG_ERRORS = {
    "unknown-algo": (["algo=ppo"], "unknown algo"),
    "missing-jsonl": (["task.name=jsonl", "task.path=/nonexistent.jsonl"], "does not exist"),
    "missing-model-dir": (["model.path=/nonexistent/model"], "does not exist"),
    "group-of-one": (["rollout.group_size=1"], "group_size"),
    "heads-do-not-divide": (["model.d_model=30", "model.n_head=4"], "divisible"),
    "completion-too-short": (["rollout.max_new_tokens=4"], "too short"),
    "unknown-key": (["no_such_key=1"], "unknown config key"),
    "not-a-number": (["optim.lr=fast"], "must be a number"),
    "unknown-loss-type": (["loss.loss_type=ppo"], "unknown loss.loss_type"),
    "unknown-agg": (["loss.agg=mean"], "unknown loss.agg"),
    "unknown-kl": (["loss.kl_type=k4"], "loss.kl_type"),
    "unknown-adv-mode": (["credit.adv_mode=zscore"], "unknown credit.adv_mode"),
}


@pytest.mark.parametrize("args, message", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_config_error_cli_exits_before_training(capsys):
    from credit_ops.trainer.__main__ import main

    assert main(["algo=nope"]) == 2
    assert "unknown algo" in capsys.readouterr().err


def test_yaml_configs_load():
    names = config_mod.shipped_configs()
    assert "default" in names and "grpo" in names
    for name in names:
        if "smollm2" not in name:  # needs a model directory
            load_config(["--config", name])


# ---- credit and verification, on hand-made rollouts
def _samples(tok, texts, group_size=None):
    from credit_ops.trainer.modeling import encode_prompt
    from credit_ops.trainer.rollout import Samples

    G = group_size or len(texts)
    prompt = encode_prompt(tok, "3+4-2=")
    completions = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    return Samples(
        prompts=[prompt] * len(texts),
        completions=completions,
        texts=texts,
        group_ids=torch.arange(len(texts)) // G,
        n_generated=sum(map(len, completions)),
    )


def _repair(tok, i, text, reward):
    from credit_ops.trainer.revise import Repair

    return Repair(i, tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], text, reward, 0)


def test_packed_rows_score_what_the_rollout_sampled():
    """The old-policy log-probs are the sampling distribution's: the packed rows (left-padded prompts of two
    lengths) score each sampled token as `generate` did. (The models' rotary positions are relative: shifting a
    whole row's position ids would change nothing here.)"""
    from credit_ops.trainer.modeling import char_tokenizer, encode_prompt, tiny_model
    from credit_ops.trainer.rollout import pack, sequence_logprobs

    tok = char_tokenizer()
    cfg = load_config([*TINY])
    torch.manual_seed(0)
    model = tiny_model(cfg, tok).eval()
    prompts = [encode_prompt(tok, "3+4-2="), encode_prompt(tok, "12+5-17=")]
    P = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=True, min_new_tokens=6, max_new_tokens=6, top_k=0, pad_token_id=tok.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=attn, output_logits=True, return_dict_in_generate=True, **kw)
    completions = out.sequences[:, P:]  # (2, 6), no EOS (the logits are the raw ones)
    want = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    batch = pack(prompts, completions.tolist(), tok.pad_token_id, "cpu")
    torch.testing.assert_close(sequence_logprobs(model, batch), want, rtol=1e-4, atol=1e-5)


def test_only_verified_repairs_join_the_loss():
    """A repair joins the loss only when it verifies (reward >= 0.5; 0 and 0.4 do not), as a training row of
    its own in its sample's prompt."""
    from credit_ops.trainer import credit
    from credit_ops.trainer.modeling import char_tokenizer
    from credit_ops.trainer.train import training_rows

    tok = char_tokenizer()
    samples = _samples(tok, ["3+4=7;7-2=5;#5", "3+4=8;8-2=6;#6", "3+4=7;7-2=4;#4", "3+4=7;7-2=6;#6"])
    rewards = [1.0, 0.0, 0.0, 0.0]
    fixed = "3+4=7;7-2=5;#5"
    repairs = [_repair(tok, 2, "3+4=7;7-2=3;#3", 0.0), _repair(tok, 1, fixed, 1.0), _repair(tok, 3, fixed, 0.4)]
    cfg = load_config(["algo=ibpo", "credit.max_edit_ratio=1.0"])
    out = credit.assign(cfg, samples, rewards, repairs, "cpu", credit.delimiter_ids(tok, ";"))
    assert out.repair_rows == [1]
    assert out.metrics["repair_verified"] == pytest.approx(1 / 3)
    assert out.edit_masks[1].any() and not out.edit_masks[2:].any()  # only sample 1 has an accepted repair
    batch, adv, gates = training_rows(samples, repairs, out, tok.pad_token_id, "cpu")
    assert len(batch) == adv.shape[0] == 4 + 1 and adv.shape[1] == batch.C
    assert batch.labels[4][batch.valid[4]].tolist() == repairs[1].ids
    assert batch.input_ids[4, : batch.P].tolist() == batch.input_ids[1, : batch.P].tolist()
    assert (adv[4] > 0).any()  # the repair's edits are credited


def test_rollout_seeds_differ_across_steps_and_processes():
    from credit_ops.trainer.train import rollout_seeds

    for world in (1, 2, 4):
        seeds = [rollout_seeds(3, step, rank, world) for step in range(50) for rank in range(world)]
        for kind in (0, 1):  # sampling, data
            assert len({s[kind] for s in seeds}) == len(seeds), (world, kind)


@pytest.mark.parametrize("algo", ["ibpo", "iop"])
def test_correct_samples_in_the_loss(algo):
    """IOP leaves the correct samples out of the loss (credit.correct_in_loss applies to the other methods)."""
    from credit_ops.trainer import credit
    from credit_ops.trainer.modeling import char_tokenizer

    tok = char_tokenizer()
    samples = _samples(tok, ["3+4=7;7-2=5;#5", "3+4=8;8-2=6;#6", "3+4=7;7-2=4;#4", "3+4=7;7-2=5;#5"])
    repairs = [_repair(tok, 1, "3+4=7;7-2=5;#5", 1.0)]
    for correct_in_loss in ("true", "false"):
        cfg = load_config([f"algo={algo}", f"credit.correct_in_loss={correct_in_loss}"])
        adv = credit.assign(cfg, samples, [1.0, 0.0, 0.0, 1.0], repairs, "cpu").advantages
        kept = algo != "iop" and correct_in_loss == "true"
        assert bool(adv[[0, 3]].abs().sum() > 0) == kept, correct_in_loss
        assert adv[1].abs().sum() > 0 and adv[2].abs().sum() > 0  # the wrong samples are in the loss


def test_references_put_correct_siblings_first():
    from credit_ops.trainer.revise import references

    rewards, groups = [0.0, 1.0, 0.0, 0.5, 1.0, 0.0], [0, 0, 0, 0, 0, 1]
    assert references(rewards, groups, 0, 2) == [1, 4]
    assert references(rewards, groups, 2, 5) == [1, 4, 3, 0]  # best first, ties in sampling order, own group


def test_adv_mode_reaches_credit_assignment():
    from credit_ops.trainer import credit
    from credit_ops.trainer.modeling import char_tokenizer

    tok = char_tokenizer()
    samples = _samples(tok, ["#5", "#6", "#4", "#6"])
    rewards = [1.0, 0.0, 0.0, 0.0]
    adv = {}
    for mode in ("", "dr_grpo"):
        cfg = load_config(["algo=grpo", f"credit.adv_mode={mode}"])
        adv[mode] = credit.assign(cfg, samples, rewards, [], "cpu").advantages[:, 0]
    torch.testing.assert_close(adv["dr_grpo"], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(adv[""], adv["dr_grpo"] / 0.5, atol=1e-5, rtol=1e-5)  # grpo: over the std 0.5


TRUNCATION = {"first-continuation-verifies": 1, "second-continuation-verifies": 2, "none-verifies": 0}


@pytest.mark.parametrize("accept_on", TRUNCATION.values(), ids=TRUNCATION.keys())
def test_verified_truncation_keeps_unverified_repairs(accept_on):
    """IOP's truncation tries K = 1, then 2 edit regions on verified repairs only, and takes the first
    continuation that verifies; otherwise the repair stays whole."""
    from credit_ops.trainer.modeling import char_tokenizer, tiny_model
    from credit_ops.trainer.revise import verified_truncation

    tok = char_tokenizer()
    cfg = load_config([*TINY, "algo=iop", "revise.verified_truncation=true", "revise.truncate_k=1"])
    torch.manual_seed(0)
    model = tiny_model(cfg, tok).eval()
    samples = _samples(tok, ["3+4=8;8-2=6;#6", "3+4=9;9-2=7;#7"])
    problem = Problem("3+4-2=", "5", ["3+4=7", "7-2=5"])
    good, bad = _repair(tok, 0, "3+4=7;7-2=5;#5", 1.0), _repair(tok, 1, "3+4=7;7-2=3;#3", 0.0)
    before = {id(r): (list(r.ids), r.reward) for r in (good, bad)}
    calls = []

    def verifier(p, text):
        calls.append(text)
        return 1.0 if len(calls) == accept_on else 0.0

    spent = verified_truncation(model, tok, [problem] * 2, samples, [good, bad], verifier, cfg, "cpu")
    assert (bad.ids, bad.reward) == before[id(bad)]
    assert len(calls) == (accept_on or 2) and spent > 0  # the verified repair has 4 edit regions
    if accept_on:  # the first K regions of the repair grafted, then the policy's continuation
        graft = {1: "3+4=7", 2: "3+4=7;7"}[accept_on]
        assert tok.decode(good.ids[: len(graft)]) == graft and good.ids[-1] == tok.eos_token_id
        assert good.ids != before[id(good)][0] and good.reward == 1.0
    else:
        assert (good.ids, good.reward) == before[id(good)]
    assert verified_truncation(model, tok, [problem] * 2, samples, [bad], verifier, cfg, "cpu") == 0
    assert len(calls) == (accept_on or 2)  # nothing was tried on the unverified repair


def test_truncate_k_keeps_the_first_regions():
    from credit_ops.trainer import credit
    from credit_ops.trainer.modeling import char_tokenizer

    tok = char_tokenizer()
    samples = _samples(tok, ["3+4=7;7-2=5;#5", "3+4=8;8-2=6;#6"])
    repairs = [_repair(tok, 1, "3+4=7;7-2=5;#5", 1.0)]
    flagged = {}
    for k in (0, 1, 2):
        cfg = load_config(["algo=diff_feedback", "credit.max_edit_ratio=1.0", f"credit.truncate_k={k}"])
        flagged[k] = credit.assign(cfg, samples, [1.0, 0.0], repairs, "cpu").edit_masks[1].nonzero().flatten().tolist()
    assert flagged == {0: [4, 6, 10, 13], 1: [4], 2: [4, 6]}  # the 8s and 6s of "3+4=8;8-2=6;#6"


def test_reset_logs_cuts_the_logs_at_the_resume_point(tmp_path):
    from credit_ops.trainer.train import reset_logs

    history = [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.25}]
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    reset_logs(str(tmp_path), 2, history)
    assert read_jsonl(tmp_path / "metrics.jsonl") == history
    assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 1}, {"step": 2}]
    reset_logs(str(tmp_path), 0, [])
    assert read_jsonl(tmp_path / "metrics.jsonl") == [] and not os.path.exists(tmp_path / "samples.jsonl")


# ---- end to end
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_runs(tmp_path, cache, algo):
    cfg, summary, rows = run(tmp_path, cache, f"algo={algo}", "steps=2", name=algo)
    assert len(rows) == 2 and summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    spec = R.ALGORITHMS[credit_algorithm(algo)]
    for r in rows:
        for key, v in r.items():
            assert v == v, key  # not NaN
        assert 0 < r["grad_norm"] < 1e3 and r["entropy"] > 0 and 0 <= r["accuracy"] <= 1
        wrong = round(N * (1 - r["accuracy"]))
        if cfg.uses_repairs:
            # the oracle repairs every wrong sample, verifiably; with max_edit_ratio=1 each joins the loss
            assert r["repair_verified"] == 1.0 and r["repair_rows"] == wrong
            assert r["num_tokens"] > rollout_tokens(r)  # the repair rows' tokens are in the loss too
            assert r["active_tokens"] < 1  # token credit: only edited tokens of the repaired samples
            assert (r["phi"] > 0) == spec["shaping"]
        else:
            assert r["repair_rows"] == r["repair_success"] == r["phi"] == 0 and r["active_tokens"] == 1
            assert r["num_tokens"] == rollout_tokens(r)
    assert any(r["repair_rows"] > 0 for r in rows) == cfg.uses_repairs
    # generated tokens accumulate: the rollouts, plus the oracle's rewritten suffixes for the credit methods
    new = [rows[0]["generated_tokens"], rows[1]["generated_tokens"] - rows[0]["generated_tokens"]]
    for r, n in zip(rows, new, strict=True):
        assert n > rollout_tokens(r) if cfg.uses_repairs else n == rollout_tokens(r)
    # the policy moved away from the warm start
    warm = torch.load(glob.glob(os.path.join(cache, "warm_*.pt"))[0], weights_only=True)
    final = weights(os.path.join(tmp_path, algo), 2)
    assert any(not torch.equal(final[k], warm[k]) for k in final)


def _steps_of(tokens):
    """Step index of each completion token: a step ends with (and holds) its ';'."""
    out, k = [], 0
    for t in tokens:
        out.append(k)
        k += t == ";"
    return out


def test_step_granularity_flags_whole_steps(tmp_path, cache):
    args = ["algo=diff_feedback", "credit.granularity=step", "steps=2", "log_samples_every=1"]
    _, _, rows = run(tmp_path, cache, *args)
    assert all(r["repair_rows"] > 0 for r in rows)
    partial = 0
    for group in read_jsonl(os.path.join(tmp_path, "run", "samples.jsonl")):
        for s in group["samples"]:
            flags = {}
            for step, m in zip(_steps_of(s["tokens"]), s["mask"], strict=True):
                flags.setdefault(step, set()).add(m)
            assert all(len(f) == 1 for f in flags.values()), s["tokens"]  # a step is flagged whole or not at all
            partial += len({m for f in flags.values() for m in f}) == 2
    assert partial > 0  # some masks flag some steps and not others


def test_iop_verified_truncation(tmp_path, cache):
    """Truncation spends policy tokens on continuations and leaves only verified repairs in the loss."""
    _, _, plain = run(tmp_path, cache, "algo=iop", "steps=2", name="plain")
    _, _, trunc = run(tmp_path, cache, "algo=iop", "revise.verified_truncation=true", "steps=2", name="trunc")
    for p, t in zip(plain, trunc, strict=True):
        assert t["accuracy"] == p["accuracy"] and t["completion_len"] == p["completion_len"]  # same rollouts
        assert t["repair_verified"] == 1.0 and t["repair_rows"] == p["repair_rows"] > 0
    assert trunc[0]["generated_tokens"] > plain[0]["generated_tokens"]
    assert [t["edit_distance"] for t in trunc] != [p["edit_distance"] for p in plain]  # some repair was shortened


def test_policy_reviser_unverified_revisions_stay_out(tmp_path, cache, monkeypatch):
    """Revisions the verifier rejects (here: every revision, whatever the barely trained policy writes) are
    generated and counted towards the budget, and none joins the loss."""
    from credit_ops.trainer import revise

    real = revise.ModelReviser.__call__

    def rejected(self, *a):
        self.verify = lambda problem, text: 0.0
        return real(self, *a)

    monkeypatch.setattr(revise.ModelReviser, "__call__", rejected)
    _, _, rows = run(tmp_path, cache, "algo=ibpo", "revise.reviser=policy", "revise.max_new_tokens=8", "steps=2")
    for r in rows:
        assert r["repair_verified"] == 0 and r["repair_rows"] == 0 and r["num_tokens"] == rollout_tokens(r)
    assert rows[0]["generated_tokens"] > rollout_tokens(rows[0])  # revision tokens count towards the budget


def test_fused_accumulated_run_matches_the_plain_one(tmp_path, cache):
    """One PPO epoch: the first ratio is exactly 1 (the old log-probs at the rollout temperature, like the loss's)
    and the gradient (norm) of a fused, micro-batched run is the plain run's."""
    common = ["algo=ibpo", "loss.beta=0.01", "rollout.temperature=0.7", "steps=1"]
    _, _, plain = run(tmp_path, cache, *common, name="plain")
    _, _, fused = run(tmp_path, cache, *common, "loss.fused=true", "optim.micro_batch_size=3", name="fused")
    for r in (plain[0], fused[0]):
        assert abs(r["ratio_mean"] - 1) < 1e-5 and r["clip_frac"] == 0 and r["kl_mean"] == pytest.approx(0, abs=1e-6)
    assert fused[0]["grad_norm"] == pytest.approx(plain[0]["grad_norm"], rel=1e-4)


def test_ppo_epochs_ratio_against_the_sampling_policy(tmp_path, cache):
    """Two PPO epochs (fused, micro-batched, KL): the second epoch's ratios and KL move away from 1 and 0."""
    args = ["algo=ibpo", "loss.fused=true", "loss.beta=0.01", "optim.micro_batch_size=3", "optim.ppo_epochs=2"]
    _, _, rows = run(tmp_path, cache, *args, "optim.lr=1e-3", "optim.warmup_steps=0", "steps=2")
    for r in rows:
        assert abs(r["ratio_mean"] - 1) > 1e-3 and r["kl_mean"] > 1e-5


def test_jsonl_task(tmp_path, cache):
    path = tmp_path / "data.jsonl"
    task = ArithTask(3, 9)
    data = task.sample(20, torch.Generator().manual_seed(0))
    with open(path, "w") as f:
        for p in data:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "steps": p.steps}) + "\n")
    assert JsonlTask(str(path)).checkable
    args = ["task.name=jsonl", f"task.path={path}", "algo=diff_feedback", "steps=2", "log_samples_every=1"]
    _, _, rows = run(tmp_path, cache, *args)
    assert all(r["repair_rows"] > 0 and r["repair_verified"] == 1 for r in rows)  # checkable: the oracle repairs
    answers = {p.prompt: p.answer for p in data}
    views = read_jsonl(os.path.join(tmp_path, "run", "samples.jsonl"))
    assert len(views) == 2 and all(answers[v["prompt"]] == v["answer"] for v in views)


def test_a_fresh_warm_start_trains_like_a_cached_one(tmp_path):
    """The run that pays for the warm start and the runs that load it from the cache train alike: no SFT
    gradient is left in .grad to join the first RL step's."""
    fresh = str(tmp_path / "cache")
    args = ["algo=ibpo", "steps=1", "eval_every=0"]
    _, _, paid = run(tmp_path, fresh, *args, name="paid")
    _, _, loaded = run(tmp_path, fresh, *args, name="loaded")
    assert [{k: v for k, v in r.items() if k != "time"} for r in paid] == [
        {k: v for k, v in r.items() if k != "time"} for r in loaded
    ]


def test_resume_is_exact(tmp_path, cache):
    """Stopped after step 2 and resumed, or resumed from step 2 after logging steps 3 and 4 (a crash after the
    last checkpoint): the metrics, the samples and the weights are the uninterrupted run's."""
    args = ["algo=ibpo", "steps=4", "eval_every=2", "save_every=2", "log_samples_every=1"]
    _, _, full = run(tmp_path, cache, *args, name="full")
    _, _, first = run(tmp_path, cache, *args, "stop_after=2", name="split")
    assert len(first) == 2
    _, _, resumed = run(tmp_path, cache, *args, "resume=auto", name="split")
    shutil.copytree(tmp_path / "full", tmp_path / "crash")
    shutil.rmtree(tmp_path / "crash" / "checkpoints" / "step_4")
    _, _, crashed = run(tmp_path, cache, *args, f"resume={tmp_path / 'crash' / 'checkpoints' / 'step_2'}", name="crash")

    def drop_time(rows):
        return [{k: v for k, v in r.items() if k != "time"} for r in rows]

    samples = read_jsonl(tmp_path / "full" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 3, 4]
    final = weights(tmp_path / "full", 4)
    for name, rows in (("split", resumed), ("crash", crashed)):
        assert drop_time(rows) == drop_time(full), name
        assert drop_time(read_metrics(tmp_path / name)) == drop_time(full), name
        assert read_jsonl(tmp_path / name / "samples.jsonl") == samples, name
        w = weights(tmp_path / name, 4)
        assert w.keys() == final.keys()
        for k in w:
            torch.testing.assert_close(w[k], final[k], rtol=0, atol=0)


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
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "credit_ops.trainer"),
        *(*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={cache}", "name=ddp", "algo=grpo", "steps=2"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(os.path.join(tmp_path, "ddp"))
    assert len(rows) == 2 and all(r["processes"] == 2 for r in rows)
    # the token counts are sums over both processes' rollouts (num_tokens: the loss's); means are their means
    assert rows[0]["generated_tokens"] == rollout_tokens(rows[0])
    assert rows[1]["generated_tokens"] - rows[0]["generated_tokens"] == rollout_tokens(rows[1])
    assert all(r["num_tokens"] == pytest.approx(r["completion_len"] * N * 2) for r in rows)


def test_local_model_dir_and_external_reviser(tmp_path, cache):
    """Any local HF model directory as the policy (model.path) and as an external reviser (revise.model_path)."""
    from credit_ops.trainer.modeling import char_tokenizer, tiny_model

    cfg = load_config([*TINY])
    tok = char_tokenizer()
    model_dir = tmp_path / "hf_model"
    torch.manual_seed(1)
    tiny_model(cfg, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = [f"model.path={model_dir}", "algo=ibpo", "revise.reviser=external", f"revise.model_path={model_dir}"]
    _, _, rows = run(tmp_path, cache, *args, "revise.max_new_tokens=8", "steps=2")
    assert rows[0]["generated_tokens"] > rollout_tokens(rows[0])  # the external reviser's tokens count
    assert all(r["repair_verified"] == 0 and r["repair_rows"] == 0 for r in rows)  # an untrained model's revisions
    # the policy is the saved model after two steps of at most ~lr each (not a fresh or a warm-started one)
    saved = load_file(model_dir / "model.safetensors")
    final = weights(tmp_path / "run", 2)
    assert final.keys() == saved.keys()
    assert max(float((final[k] - saved[k]).abs().max()) for k in final) < 5 * 2 * cfg.optim.lr
