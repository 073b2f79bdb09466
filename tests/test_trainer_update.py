"""The trainer's update step (credit_ops.trainer.train.update) against the op called directly on the whole batch.

The promise of gradient accumulation (trainer/loss.py): one optimizer step applies the gradient of the loss over
the full batch, whether the batch is split into micro-batches (optim.micro_batch_size), spread over processes, or
both; and every PPO epoch's ratio is against the sampling policy's log-probs. The expected gradients come from
credit_ops.policy_loss on the reference backend over full-batch logits, no trainer code involved.

Run as a module (`accelerate launch ... -m tests.test_trainer_update OUT`) it is the 2-process half of the
accumulation test: each process updates on its half of the batch and rank 0 saves the gradients it applied.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from credit_ops.trainer.config import load_config
from credit_ops.trainer.loss import loss_settings
from credit_ops.trainer.modeling import char_tokenizer, tiny_model
from credit_ops.trainer.rollout import pack, sequence_logprobs
from credit_ops.trainer.train import update

import credit_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "rollout.max_new_tokens=24"]
N_ROWS = 8  # 3 + 3 + 2 rows in micro-batches of 3; 4 rows per process with 2, then 3 + 1
# (loss type, algorithm): a token_mean loss, a seq_mean loss, a sequence-ratio loss with gates
LOSSES = {"dapo": "ibpo", "grpo": "grpo", "gated_gspo": "iop"}
CASES = [(lt, fused) for lt in LOSSES for fused in (False, True)]


def case_id(loss_type, fused):
    return f"{loss_type}-{'fused' if fused else 'logits'}"


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps, at every step, the parameters and the gradients it is about to apply."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen = []  # [(params, grads)] per step

    def step(self, closure=None):
        ps = [p for g in self.param_groups for p in g["params"]]
        self.seen.append(([p.detach().clone() for p in ps], [p.grad.detach().clone() for p in ps]))
        return super().step(closure)


def setup(loss_type, *args, noise=True, seed=0):
    """A tiny model and one step's training rows of varying lengths: (cfg, model, batch, adv, gates, old, ref).

    With noise the old and reference log-probs are the model's perturbed, so that ratios leave the clip range
    (the sequence ratios of the GSPO family by far less: their range is 3e-4 wide)."""
    cfg = load_config([*MODEL, f"algo={LOSSES[loss_type]}", f"loss.loss_type={loss_type}", "loss.beta=0.04", *args])
    tok = char_tokenizer()
    torch.manual_seed(seed)
    model = tiny_model(cfg, tok)
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(4, len(tok), (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()

    prompts = [[tok.bos_token_id, *ids(2, 6)] for _ in range(N_ROWS)]
    completions = [ids(1, 11) + [tok.eos_token_id] for _ in range(N_ROWS)]
    batch = pack(prompts, completions, tok.pad_token_id, "cpu")
    valid = batch.valid.float()
    adv = torch.randn(batch.labels.shape, generator=g) * valid
    gates = (torch.rand(batch.labels.shape, generator=g) < 0.7).float() * valid if loss_type == "gated_gspo" else None
    lp = sequence_logprobs(model, batch, temperature=cfg.rollout.temperature)
    scale = (1e-3 if loss_type == "gated_gspo" else 0.3) if noise else 0.0
    old = lp + scale * torch.randn(lp.shape, generator=g) * valid
    ref = lp + 0.1 * torch.randn(lp.shape, generator=g) * valid
    return cfg, model, batch, adv, gates, old, ref


def full_batch_grads(model, params, batch, adv, gates, old, ref, settings, old_logprobs=True):
    """The gradient of the loss over the whole batch at `params`, from the reference op on full-batch logits."""
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, v in zip(m.parameters(), params, strict=True):
            p.copy_(v)
    out = m(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    )
    logits = out.logits[:, batch.P - 1 : batch.P + batch.C - 1]  # the logits scoring completion tokens 0 .. C-1
    old = old if old_logprobs else None
    with credit_ops.use_backend("reference"):
        loss, _ = credit_ops.policy_loss(
            logits, batch.labels, adv, old_logprobs=old, ref_logprobs=ref, gates=gates, **settings
        )
    loss.backward()
    return [p.grad for p in m.parameters()]


def run_update(acc, cfg, model, batch, adv, gates, old, ref, lr=1e-3):
    """train.update on (this process's share of) the rows; returns the optimizer's record and the stats."""
    opt = RecordingAdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = acc.prepare(model, opt, sched)
    stats, _ = update(acc, model, opt, sched, batch, adv, gates, old, ref, loss_settings(cfg), cfg)
    return opt.optimizer.seen, stats


def assert_grads_close(got, want, msg=""):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda m, i=i: f"{msg} parameter {i}: {m}")


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


# ---- one process
@pytest.mark.parametrize("micro", [0, 3], ids=["full-batch", "micro-batches-of-3"])
@pytest.mark.parametrize("loss_type, fused", CASES, ids=[case_id(*c) for c in CASES])
def test_update_applies_the_full_batch_gradient(loss_type, fused, micro):
    """One optimizer step: the gradient applied is the full batch's, with or without micro-batches."""
    cfg, model, batch, adv, gates, old, ref = setup(
        loss_type, f"loss.fused={str(fused).lower()}", f"optim.micro_batch_size={micro}", "optim.max_grad_norm=1e9"
    )
    want = full_batch_grads(model, list(model.parameters()), batch, adv, gates, old, ref, loss_settings(cfg))
    seen, stats = run_update(_accelerator(), cfg, model, batch, adv, gates, old, ref)
    assert len(seen) == 1
    assert_grads_close(seen[0][1], want)
    if loss_type != "gated_gspo":  # the perturbed old log-probs clip some tokens: their gradient is zero
        assert stats["clip_frac"] > 0


def test_every_ppo_epoch_is_against_the_sampling_policy():
    """ppo_epochs=2: the second step's gradient is the loss's at the updated weights with the ratio against the
    log-probs of the policy that sampled (not 1), micro-batched like the first."""
    cfg, model, batch, adv, gates, old, ref = setup(
        "dapo", "optim.ppo_epochs=2", "optim.micro_batch_size=3", "optim.max_grad_norm=1e9", noise=False
    )
    settings = loss_settings(cfg)
    seen, stats = run_update(_accelerator(), cfg, model, batch, adv, gates, old, ref, lr=1e-2)
    assert len(seen) == 2
    (p0, g0), (p1, g1) = seen
    assert_grads_close(g0, full_batch_grads(model, p0, batch, adv, gates, old, ref, settings), "epoch 1")
    want = full_batch_grads(model, p1, batch, adv, gates, old, ref, settings)
    assert_grads_close(g1, want, "epoch 2")
    # the check can fail: at the updated weights a ratio of 1 gives another gradient, and the ratios moved
    ratio_one = full_batch_grads(model, p1, batch, adv, gates, old, ref, settings, old_logprobs=False)
    assert max(float((a - b).abs().max()) for a, b in zip(want, ratio_one, strict=True)) > 1e-4
    assert abs(stats["ratio_mean"] - 1) > 1e-3 and stats["clip_frac"] > 0  # epoch 2's ratios are not all 1


# ---- two processes (DDP over gloo)
def _two_process_main(out_dir):
    acc = _accelerator()
    rank, world = acc.process_index, acc.num_processes
    share = slice(rank * N_ROWS // world, (rank + 1) * N_ROWS // world)
    results = {}
    for loss_type, fused in CASES:
        cfg, model, batch, adv, gates, old, ref = setup(
            loss_type, f"loss.fused={str(fused).lower()}", "optim.micro_batch_size=3", "optim.max_grad_norm=1e9"
        )
        part = [None if t is None else t[share] for t in (adv, gates, old, ref)]
        seen, _ = run_update(acc, cfg, model, batch.rows(share), *part)
        results[case_id(loss_type, fused)] = seen[0][1]
    if acc.is_main_process:
        torch.save(results, os.path.join(out_dir, "grads.pt"))
    acc.wait_for_everyone()
    acc.end_training()


def test_two_processes_apply_the_full_batch_gradient(tmp_path):
    """2 processes, 4 rows each in micro-batches of 3 and 1: the step applies the gradient of the 8-row batch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("-m", "tests.test_trainer_update", str(tmp_path)),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(os.path.join(tmp_path, "grads.pt"))
    assert sorted(got) == sorted(case_id(*c) for c in CASES)
    for loss_type, fused in CASES:
        cfg, model, batch, adv, gates, old, ref = setup(loss_type, f"loss.fused={str(fused).lower()}")
        want = full_batch_grads(model, list(model.parameters()), batch, adv, gates, old, ref, loss_settings(cfg))
        assert_grads_close(got[case_id(loss_type, fused)], want, case_id(loss_type, fused))


if __name__ == "__main__":
    _two_process_main(sys.argv[1])
