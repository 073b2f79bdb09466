"""The trainer's credit path: IOP's verified K reaching credit_assign (revise.verified_truncation), and the
old-policy forward skipped when it equals the training forward (optim.ppo_epochs=1).

Hand-made rollouts on the character tokenizer: sample 1 "3+4=8;8-2=6;#6" slips in its first step; its minimal
repair "3+4=7;7-2=5;#5" differs from it in four edit regions (the 8, 8, 6, 6), only the first of which is an error
of its own: the others follow from it.
"""

import pytest
import torch
from credit_ops.trainer import credit
from credit_ops.trainer import revise as revise_mod
from credit_ops.trainer.config import load_config
from credit_ops.trainer.modeling import char_tokenizer, encode_prompt
from credit_ops.trainer.revise import Repair, verified_truncation
from credit_ops.trainer.rollout import Samples
from credit_ops.trainer.tasks import Problem

PROMPT = "3+4-2="
PROBLEM = Problem(PROMPT, "5", ["3+4=7", "7-2=5"])
WRONG = "3+4=8;8-2=6;#6"
FIXED = "3+4=7;7-2=5;#5"
ALL_FLAGS = [4, 6, 10, 13]  # the 8s and 6s of WRONG


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def samples_of(tok, texts):
    completions = [ids_of(tok, t) for t in texts]
    return Samples([encode_prompt(tok, PROMPT)] * len(texts), completions, texts, torch.zeros(len(texts)).long(), 0)


def repair(tok, i, text, reward=1.0, k=None):
    return Repair(i, ids_of(tok, text), text, reward, 0, k)


def flags(out, i):
    return out.edit_masks[i].nonzero().flatten().tolist()


def assign(tok, samples, repairs, *args, algo="iop"):
    cfg = load_config([f"algo={algo}", "credit.max_edit_ratio=1.0", *args])
    return credit.assign(cfg, samples, [1.0, 0.0], repairs, "cpu", credit.delimiter_ids(tok, ";"))


def continue_as_the_oracle(monkeypatch, tok):
    """The policy's continuation in verified_truncation: the rest of FIXED after the grafted prefix (what a policy
    that has learnt the chain writes: every later step recomputed from the fixed one)."""
    full = ids_of(tok, FIXED)
    prompt_len = len(encode_prompt(tok, PROMPT))

    def fake_generate(model, tokenizer, prompts, **kw):
        (prompt,) = prompts
        prefix = prompt[prompt_len:]
        assert full[: len(prefix)] == prefix  # the repair's own tokens were grafted
        return [full[len(prefix) :]], [tok.decode(full[len(prefix) :], skip_special_tokens=True)]

    monkeypatch.setattr(revise_mod, "generate", fake_generate)


def test_verified_k_reaches_the_masks(monkeypatch, tok):
    """The cause of the bit-identical runs: the verified continuation is the full repair again, token for token, so
    only the K that verified can change the credit; it does: both masks keep the first region only."""
    samples = samples_of(tok, [FIXED, WRONG])
    r = repair(tok, 1, FIXED)
    before = list(r.ids)
    cfg = load_config(["algo=iop", "revise.verified_truncation=true", "revise.truncate_k=1"])
    continue_as_the_oracle(monkeypatch, tok)
    spent = verified_truncation(None, tok, [PROBLEM] * 2, samples, [r], lambda p, t: float(t == FIXED), cfg, "cpu")
    assert r.ids == before and spent == len(before) - len("3+4=7")  # the same tokens...
    assert r.k == 1  # ...but K = 1 verified
    full = assign(tok, samples, [repair(tok, 1, FIXED)])
    truncated = assign(tok, samples, [r])
    assert flags(full, 1) == ALL_FLAGS and flags(truncated, 1) == [4]
    assert truncated.metrics["truncated_repairs"] == 1 and full.metrics["truncated_repairs"] == 0
    assert truncated.metrics["active_tokens"] < full.metrics["active_tokens"]
    # the repair row: credit on its first region only (the 7 of "3+4=7")
    row = truncated.advantages[2].nonzero().flatten().tolist()
    assert row == [4] and len(full.advantages[2].nonzero()) == 4
    # the wrong sample's gates (gated GSPO): the first region only
    assert truncated.gates[1].nonzero().flatten().tolist() == [4]


def test_verified_k_and_the_runs_truncate_k(tok):
    """credit.truncate_k and the verified K: each sample keeps the smaller; samples without a verified K keep the
    run's k (0: all regions)."""
    samples = samples_of(tok, [FIXED, WRONG])
    for run_k, verified_k, want in [(0, 2, [4, 6]), (1, 2, [4]), (3, 2, [4, 6]), (2, None, [4, 6]), (0, None, None)]:
        out = assign(tok, samples, [repair(tok, 1, FIXED, k=verified_k)], f"credit.truncate_k={run_k}")
        assert flags(out, 1) == (want or ALL_FLAGS), (run_k, verified_k)


@pytest.mark.parametrize("granularity", ["token", "step"])
def test_the_chosen_repair_decides_the_k(tok, granularity):
    """Two verified repairs of one sample with different K: the one credit_assign chooses (the closest) sets the
    sample's k, whichever of them carries the K; an unverified repair's K never counts."""
    samples = samples_of(tok, [FIXED, WRONG])
    farther = "3+4=7;7-2=5;##5"
    step = f"credit.granularity={granularity}"
    # step granularity: every token of a flagged step ("3+4=8;", "8-2=6;", "#6<eos>"); k keeps the first k steps
    want_all = ALL_FLAGS if granularity == "token" else list(range(len(WRONG) + 1))
    want_1 = [4] if granularity == "token" else [0, 1, 2, 3, 4, 5]
    near_k = assign(tok, samples, [repair(tok, 1, farther), repair(tok, 1, FIXED, k=1)], step)
    far_k = assign(tok, samples, [repair(tok, 1, farther, k=1), repair(tok, 1, FIXED)], step)
    unverified = assign(tok, samples, [repair(tok, 1, "3+4=7;7-2=4;#4", 0.0, k=1), repair(tok, 1, FIXED)], step)
    assert flags(near_k, 1) == want_1 and near_k.metrics["truncated_repairs"] == 1
    assert flags(far_k, 1) == want_all and far_k.metrics["truncated_repairs"] == 0
    assert flags(unverified, 1) == want_all


# ---- the old-policy forward, skipped at one PPO epoch
# (loss type, algorithm): a token_mean loss, a seq_mean loss, IOP's gated sequence-ratio loss
LOSSES = {"dapo": "ibpo", "grpo": "grpo", "gated_gspo": "iop"}
SKIP_CASES = [(lt, fused, micro) for lt in LOSSES for fused in (False, True) for micro in (0, 3)]


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps the gradients it applies, step by step."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def rows(tok, cfg, seed=0):
    """A tiny model and one step's training rows of varying lengths, with advantages, gates, reference log-probs."""
    from credit_ops.trainer.modeling import tiny_model
    from credit_ops.trainer.rollout import pack, sequence_logprobs

    torch.manual_seed(seed)
    model = tiny_model(cfg, tok)
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(4, len(tok), (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()

    batch = pack([[tok.bos_token_id, *ids(2, 6)] for _ in range(8)], [ids(1, 11) for _ in range(8)], 0, "cpu")
    valid = batch.valid.float()
    adv = torch.randn(batch.labels.shape, generator=g) * valid
    gates = (torch.rand(batch.labels.shape, generator=g) < 0.7).float() * valid
    ref = sequence_logprobs(model, batch) + 0.1 * torch.randn(batch.labels.shape, generator=g) * valid
    return model, batch, adv, gates if cfg.loss_type == "gated_gspo" else None, ref


@pytest.mark.parametrize("loss_type, fused, micro", SKIP_CASES)
def test_skipping_the_old_policy_forward_changes_nothing(tok, loss_type, fused, micro):
    """optim.ppo_epochs=1: update() with old_logprobs=None (the forward skipped) applies the same gradient and
    reports the same statistics as with the old policy's log-probs computed as the trainer did before (the
    sampling model in eval mode, the rollout temperature, the micro-batches): the same weights after the step."""
    import copy

    from accelerate import Accelerator
    from credit_ops.trainer.loss import loss_settings
    from credit_ops.trainer.rollout import sequence_logprobs
    from credit_ops.trainer.train import update

    args = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "rollout.max_new_tokens=24", "loss.beta=0.04"]
    args += [f"algo={LOSSES[loss_type]}", f"loss.loss_type={loss_type}", f"loss.fused={str(fused).lower()}"]
    cfg = load_config([*args, f"optim.micro_batch_size={micro}", "rollout.temperature=0.7"])
    model, batch, adv, gates, ref = rows(tok, cfg)
    old = sequence_logprobs(model.eval(), batch, temperature=0.7, micro_batch=micro)
    out = {}
    for name, old_lp in (("old", old), ("skipped", None)):
        m = copy.deepcopy(model)
        opt = RecordingAdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        acc = Accelerator(cpu=True)
        m, opt, sched = acc.prepare(m, opt, sched)
        stats, grad_norm = update(acc, m, opt, sched, batch, adv, gates, old_lp, ref, loss_settings(cfg), cfg)
        out[name] = (opt.optimizer.grads, stats, grad_norm, [p.detach() for p in m.parameters()])
    (g_old, s_old, n_old, w_old), (g_new, s_new, n_new, w_new) = out["old"], out["skipped"]
    assert len(g_old) == len(g_new) == 1
    # bit for bit on the CPU: the old log-probs equal the training forward's, so the ratio was exactly 1 before too
    assert all(torch.equal(a, b) for a, b in zip(g_old[0], g_new[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(w_old, w_new, strict=True))
    assert n_new == n_old > 0
    assert s_new.keys() == s_old.keys() and s_new["ratio_mean"] == 1.0 and s_new["clip_frac"] == 0.0
    for key in s_old:
        assert s_new[key] == pytest.approx(s_old[key], rel=1e-6, abs=1e-7), key


def test_one_epoch_runs_no_old_policy_forward(tmp_path, monkeypatch):
    """A training step at ppo_epochs=1 runs no log-prob forward outside the update (none without a reference
    model), and logs the entropy from the update's forward; at ppo_epochs=2 the old policy's forward runs."""
    from credit_ops.trainer import train as train_mod

    calls = []
    real = train_mod.sequence_logprobs

    def counting(model, batch, **kw):
        calls.append(len(batch))
        return real(model, batch, **kw)

    monkeypatch.setattr(train_mod, "sequence_logprobs", counting)
    tiny = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "warm_start.steps=0", "rollout.prompts_per_step=2"]
    tiny += ["rollout.group_size=2", "rollout.max_new_tokens=24", "threads=1", "progress=false", "report=false"]
    tiny += ["eval_every=0", "eval_prompts=2", f"out_dir={tmp_path}", "algo=grpo", "steps=1", "loss.beta=0"]
    rows_ = {}
    for epochs in (1, 2):
        calls.clear()
        train_mod.train(load_config([*tiny, f"optim.ppo_epochs={epochs}", f"name=e{epochs}"]))
        rows_[epochs] = (list(calls), read_metrics(tmp_path / f"e{epochs}"))
    assert rows_[1][0] == [] and rows_[2][0] == [4]  # the four samples' rows, once
    for _, metrics in rows_.values():
        assert metrics[0]["entropy"] == metrics[0]["entropy_mean"] > 0


def read_metrics(run_dir):
    import json

    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]
