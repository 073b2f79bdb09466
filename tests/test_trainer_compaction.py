"""Active-token compaction in the trainer (loss.compact, on by default): a few optimizer steps with and without it
give the same weights and the same whole-batch statistics (entropy, token count), over logits and through the
fused head; the fused head's old-policy / reference pass computes the tokens the loss reads and nothing else."""

import copy

import pytest
import torch
from credit_ops.trainer.loss import head_logprobs, loss_settings, loss_tokens
from credit_ops.trainer.rollout import sequence_logprobs

from tests.test_trainer_update import _accelerator, run_update, setup

CASES = [(fused, beta) for fused in (False, True) for beta in (0.0, 0.04)]
IDS = [f"{'fused' if f else 'logits'}-beta{b}" for f, b in CASES]


def credit_batch(*args):
    """setup()'s rows with credit-method inputs: gates 0 outside the 'edits', two rows (a group with equal rewards)
    with advantage 0, so that about a third of the valid tokens carry a loss coefficient."""
    cfg, model, batch, adv, _, old, ref = setup("dapo", *args)
    g = torch.Generator().manual_seed(7)
    valid = batch.valid.float()
    gates = (torch.rand(batch.labels.shape, generator=g) < 0.5).float() * valid
    adv = adv.clone()
    adv[2:4] = 0.0
    return cfg, model, batch, adv, gates, old, ref


@pytest.mark.parametrize("fused,beta", CASES, ids=IDS)
def test_compaction_gives_the_same_update(fused, beta):
    """3 PPO epochs (3 optimizer steps) in micro-batches of 3: the same weights and whole-batch statistics with
    loss.compact on as off (summation order may differ on the fused head); clip fraction, ratio and KL then cover
    the active tokens, and the entropy too with loss.whole_batch_entropy=false."""
    runs = {}
    for compact, whole in [(False, True), (True, True), (True, False)]:
        args = ("optim.ppo_epochs=3", "optim.micro_batch_size=3", f"loss.beta={beta}", "optim.max_grad_norm=1e9")
        args += (f"loss.fused={str(fused).lower()}", f"loss.compact={str(compact).lower()}")
        cfg, model, batch, adv, gates, old, ref = credit_batch(*args, f"loss.whole_batch_entropy={str(whole).lower()}")
        assert loss_settings(cfg)["active_only"] is compact
        model = copy.deepcopy(model)
        _, stats = run_update(_accelerator(), cfg, model, batch, adv, gates, old, ref, lr=1e-2)
        runs[compact, whole] = ([p.detach().clone() for p in model.parameters()], stats)
    (dense_w, dense), (sparse_w, sparse), (_, active_entropy) = runs.values()
    start = [p.detach() for p in setup("dapo")[1].parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(dense_w, start, strict=True)) > 1e-3  # the weights moved
    for i, (a, b) in enumerate(zip(sparse_w, dense_w, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, i=i: f"parameter {i}: {m}")
    assert sparse["num_tokens"] == dense["num_tokens"] == float(batch.valid.sum())
    assert sparse["entropy_mean"] == pytest.approx(dense["entropy_mean"], rel=1e-6)
    # loss.whole_batch_entropy=false: the same update, the entropy of the active tokens only
    assert all(torch.equal(a, b) for a, b in zip(runs[True, False][0], sparse_w, strict=True))
    assert active_entropy["entropy_mean"] != pytest.approx(dense["entropy_mean"], rel=1e-5)  # near-uniform at init
    active = loss_tokens(batch, adv, gates, loss_settings(cfg))
    assert 0 < active.sum() < 0.6 * batch.valid.sum()  # the case compacts
    if beta:  # the means over the active tokens differ from the whole batch's
        assert sparse["kl_mean"] != pytest.approx(dense["kl_mean"], rel=1e-3)


def test_fused_pass_computes_the_loss_tokens_only():
    """The fused head's old-policy / reference pass (head_logprobs, what train() runs with loss.fused and
    loss.compact) gives the model's log-probs on the tokens the loss reads and 0 elsewhere; loss_tokens is None
    without compaction and for the GSPO family (train() then runs sequence_logprobs over the logits)."""
    cfg, model, batch, adv, gates, _, _ = credit_batch("loss.fused=true", "loss.beta=0.0")
    settings = loss_settings(cfg)
    want = sequence_logprobs(model, batch, temperature=cfg.rollout.temperature)
    select = loss_tokens(batch, adv, gates, settings)
    assert not select.all() and select.any()
    got = head_logprobs(model, batch, select, temperature=cfg.rollout.temperature, micro_batch=3)
    torch.testing.assert_close(got[select], want[select], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[~select], torch.zeros_like(got[~select]))
    assert loss_tokens(batch, adv, gates, {**settings, "active_only": False}) is None
    assert loss_tokens(batch, adv, gates, {**settings, "loss_type": "gated_gspo"}) is None


def test_training_run_with_and_without_compaction(tmp_path):
    """Two IBPO training steps (oracle repairs: gates 0 outside their edits) of the fused head with a reference
    model and 2 PPO epochs (old-policy and reference passes through head_logprobs on the loss's tokens): the
    weights of loss.compact=false, and the same entropy."""
    from credit_ops.trainer.config import load_config
    from credit_ops.trainer.train import train
    from safetensors.torch import load_file

    tiny = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "warm_start.steps=0", "rollout.prompts_per_step=2"]
    tiny += ["rollout.group_size=4", "rollout.max_new_tokens=24", "threads=1", "progress=false", "report=false"]
    tiny += [
        "eval_every=0",
        "eval_prompts=2",
        f"out_dir={tmp_path}",
        "algo=ibpo",
        "revise.reviser=oracle",
        "credit.max_edit_ratio=1.0",
        "steps=2",
        "loss.beta=0.04",
    ]
    tiny += ["loss.fused=true", "optim.ppo_epochs=2", "optim.lr=1e-3"]
    out = {}
    for compact in (False, True):
        name = f"compact_{compact}"
        summary = train(load_config([*tiny, f"loss.compact={str(compact).lower()}", f"name={name}"]))
        out[compact] = (load_file(str(tmp_path / name / "checkpoints" / "step_2" / "model.safetensors")), summary)
    (dense_w, dense), (sparse_w, sparse) = out[False], out[True]
    assert dense_w.keys() == sparse_w.keys()
    for k in dense_w:
        torch.testing.assert_close(sparse_w[k], dense_w[k], rtol=1e-5, atol=1e-6, msg=k)
    assert sparse["entropy"] == pytest.approx(dense["entropy"], rel=1e-5)
    assert sparse["num_tokens"] == dense["num_tokens"]
    assert 0 < sparse["active_tokens"] < 1  # gates 0 outside the repaired samples' edits: the run compacts
