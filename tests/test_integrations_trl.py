"""credit_ops.integrations.trl: CreditGRPOTrainer against a stock trl.GRPOTrainer, and its credit on a tiny model.

Offline and on the CPU: a random 2-layer Qwen2 (d=32) built from a config and the project's character tokenizer,
saved to a temporary directory (TRL builds the reference model from the path). fp32 throughout (TRL defaults to
bf16 autocast, whose rounding would hide a real difference), one torch thread (2 shared cores).
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(
        f"credit_ops.integrations.trl is tested with trl 1.16.x, found {trl.__version__}", allow_module_level=True
    )

from credit_ops.trainer.modeling import char_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import credit_ops  # noqa: E402
from credit_ops.integrations import trl as ctrl  # noqa: E402
from credit_ops.integrations.trl import (  # noqa: E402
    CreditConfig,
    CreditGRPOTrainer,
    ExternalReviser,
    OracleReviser,
    PolicyReviser,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = str(tmp_path_factory.mktemp("tiny"))
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dataset(n=16):
    return Dataset.from_list(
        [{"prompt": f"{i % 10}+{i * 3 % 10}=", "answer": str(i % 10 + i * 3 % 10)} for i in range(n)]
    )


def reward(completions, answer, **kw):
    """1 for a completion that starts with the answer, plus a little per digit (so groups have a spread)."""
    return [
        float(c.startswith(a)) + 0.05 * sum(ch.isdigit() for ch in c) for c, a in zip(completions, answer, strict=True)
    ]


UNSCORED = []


def reward_or_none(prompts, completions, answer, **kw):
    """reward(), but unscorable (None) for about a third of the completions: TRL leaves them out of the statistics."""
    out = [
        None if c[:1] in "0123456789abcdefghijklmnopqrst" else r
        for c, r in zip(completions, reward(completions, answer), strict=True)
    ]
    UNSCORED.append(out.count(None))
    return out


def fix_prefix(prompt, completion, answer, **row):
    """The task oracle: write the answer over the start of the completion (None, no repair, for answers of 3k)."""
    return None if int(answer) % 3 == 0 else answer + completion[len(answer) :]


def initial_parameters(model_dir):
    return torch.cat([p.detach().flatten() for p in Qwen2ForCausalLM.from_pretrained(model_dir).parameters()])


def config(model_dir, **kw):
    base = dict(
        output_dir=os.path.join(model_dir, "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=10,
        max_steps=2,
        learning_rate=1e-2,
        seed=0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        adam_epsilon=1e-4,  # see the note on Adam at the parity test
    )
    return GRPOConfig(**{**base, **kw})


def train(cls, model_dir, args, reward_funcs=reward, **kw):
    trainer = cls(
        model=model_dir,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset(),
        processing_class=char_tokenizer(),
        **kw,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    return trainer, logs


# ---- parity: algorithm="grpo" is TRL's GRPO, with TRL's loss and with credit_ops' fused loss
PARITY = {
    # loss_type, beta, importance sampling, gradient accumulation; each TRL option at least once
    "dapo-token-ga1-unscorable": dict(loss_type="dapo", epsilon_high=0.28),
    "grpo-beta-sequence-ga2": dict(
        loss_type="grpo",
        beta=0.1,
        use_bias_correction_kl=False,
        importance_sampling_level="sequence",
        gradient_accumulation_steps=2,
    ),
    "bnpo-token-ga2-iterations2-delta": dict(
        loss_type="bnpo", gradient_accumulation_steps=2, num_iterations=2, delta=1.3
    ),
    "dr_grpo-beta-token-ga1-batchstd-unscorable": dict(
        loss_type="dr_grpo", beta=0.1, use_bias_correction_kl=False, scale_rewards="batch"
    ),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_grpo_parity_with_stock_trainer(model_dir, case):
    """Logged losses, grad norms and loss metrics equal to fp32 rounding over two optimizer steps.

    TRL's group statistics are fp32, credit_ops' float64: where a reward equals its group's fp32 mean TRL's advantage
    is exactly 0 and ours ~1e-8. Adam's first step turns such a gradient of ~1e-9 into a full-size update at
    adam_epsilon=1e-8 (parameters with no other gradient, e.g. the embedding rows of that row's tokens), hence
    adam_epsilon=1e-4 here.
    """
    args = PARITY[case]
    funcs = reward_or_none if "unscorable" in case else reward
    UNSCORED.clear()
    _, stock = train(GRPOTrainer, model_dir, config(model_dir, **args), reward_funcs=funcs)
    assert funcs is reward or sum(UNSCORED) > 0
    grpo = CreditConfig(algorithm="grpo")
    for fused in (False, True):
        trainer, ours = train(
            CreditGRPOTrainer,
            model_dir,
            config(model_dir, **args),
            reward_funcs=funcs,
            credit=grpo,
            use_credit_ops_loss=fused,
        )
        assert len(ours) == len(stock) == 2
        for a, b in zip(stock, ours, strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-6, (fused, a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (
                fused,
                a["grad_norm"],
                b["grad_norm"],
            )
            for key in ("entropy", "clip_ratio/region_mean", "kl", "reward"):
                if key in a:
                    assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (fused, key, a[key], b[key])
            assert b.get("credit/active_tokens", 1.0) == 1.0  # sequence credit: every scored token
        ca = trainer.credit_last
        assert ca.advantages.shape == (8 * args.get("gradient_accumulation_steps", 1), ca.advantages.shape[1])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_loss_parity_off_policy(model_dir, loss_type, level):
    """TRL's _compute_loss against the credit loss on one batch far off-policy (old / reference log-probs = current
    + N(0, 0.3^2)): per-token advantages of both signs, clipping, delta (credit_ops' dual clip), KL, an empty row."""
    args = config(
        model_dir,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.1,
        use_bias_correction_kl=False,
        epsilon_high=0.28,
        delta=1.3,
        gradient_accumulation_steps=2,
    )
    trainer = CreditGRPOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset(),
        processing_class=char_tokenizer(),
        credit=CreditConfig(algorithm="grpo"),
        use_credit_ops_loss=True,
    )
    trainer.current_gradient_accumulation_steps = 2
    model = trainer.model.train()
    g = torch.Generator().manual_seed(1)
    B, P, C, V = 6, 3, 7, model.config.vocab_size
    lengths = torch.tensor([7, 5, 3, 7, 1, 0])
    inputs = dict(
        prompt_ids=torch.randint(4, V, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(4, V, (B, C), generator=g),
        completion_mask=(torch.arange(C) < lengths.unsqueeze(1)).long(),
        advantages=torch.randn(B, C, generator=g),
    )
    inputs["prompt_mask"][0, 0] = 0  # left padding
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, C)
    drift = torch.tensor([[-0.5], [0.4], [-0.4], [0.3], [-0.6], [0.0]])  # whole rows off too (sequence ratios > delta)
    inputs["old_per_token_logps"] = logps + drift + 0.3 * torch.randn(B, C, generator=g)
    inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(B, C, generator=g)
    inputs["num_items_in_batch"] = 2 * inputs["completion_mask"].sum()  # a generation batch of two micro-batches

    def loss_and_grads(fused, delta=1.3):
        trainer.use_credit_ops_loss, trainer.args.delta = fused, delta
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        return loss.detach(), [p.grad.clone() for p in model.parameters()], metrics

    stock, stock_grads, stock_metrics = loss_and_grads(False)
    ours, our_grads, our_metrics = loss_and_grads(True)
    assert abs(stock - ours) <= 1e-6 * max(1.0, abs(stock)), (stock, ours)
    for a, b in zip(stock_grads, our_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    for key in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert abs(stock_metrics[key] - our_metrics[key]) <= 1e-5, (key, stock_metrics[key], our_metrics[key])
    assert stock_metrics["clip_ratio/region_mean"] > 0  # the clipped branches are exercised
    assert not torch.equal(loss_and_grads(False, delta=None)[0], stock)  # and so is delta


# ---- IBPO with an oracle: which tokens get gradient
class RowIds(CreditGRPOTrainer):
    """Tags every row of the generation batch (TRL shuffles and splits it) with its index; records each loss call."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        out["row_id"] = torch.arange(out["advantages"].shape[0])
        self.calls = []
        return out


@pytest.mark.parametrize("fused", [False, True], ids=["trl-loss", "credit-loss"])
def test_ibpo_oracle_masked_tokens_get_no_gradient(model_dir, monkeypatch, fused):
    grads = {}
    if fused:  # gradient of the hidden states the LM head scores (position t feeds only the head at t)
        real = credit_ops.fused_linear_policy_loss

        def spy(hidden, weight, labels, advantages, **kw):
            hidden.register_hook(lambda g: grads.setdefault("g", g.detach().clone()))
            return real(hidden, weight, labels, advantages, **kw)

        monkeypatch.setattr(credit_ops, "fused_linear_policy_loss", spy)
    else:  # gradient of TRL's per-token log-probs
        real = GRPOTrainer._get_per_token_logps_and_entropies

        def spy(self, *a, compute_entropy=False, **kw):
            logps, ent, aux = real(self, *a, compute_entropy=compute_entropy, **kw)
            if compute_entropy and logps.requires_grad:  # the policy pass of _compute_loss
                logps.register_hook(lambda g: grads.setdefault("g", g.detach().clone()))
            return logps, ent, aux

        monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    seen = {}
    real_loss = CreditGRPOTrainer._compute_loss

    def record(self, model, inputs):
        seen.update(inputs)
        return real_loss(self, model, inputs)

    monkeypatch.setattr(CreditGRPOTrainer, "_compute_loss", record)
    trainer, logs = train(
        RowIds,
        model_dir,
        config(model_dir, max_steps=1),
        credit=CreditConfig(algorithm="ibpo"),
        reviser=OracleReviser(fix_prefix),
        use_credit_ops_loss=fused,
    )
    ca = trainer.credit_last
    N = ca.advantages.shape[0]
    row_id, adv, mask = seen["row_id"], seen["advantages"], seen["completion_mask"].bool()
    g = grads["g"]
    assert ca.has_repair.any() and not ca.has_repair.all()
    T = ca.advantages.shape[1]  # the samples' width (repair rows may be longer: the batch is padded to them)
    edited_negative = 0
    for r, i in enumerate(row_id.tolist()):
        if i >= N:  # a repair row: +|A| on its inserted / substituted tokens, nothing elsewhere
            j = ca.repair_selected.nonzero().flatten()[i - N]
            Tr = ca.repair_advantages.shape[1]
            torch.testing.assert_close(adv[r, :Tr], ca.repair_advantages[j].to(adv.dtype))
            assert (adv[r] >= 0).all()
            continue
        assert not mask[r, T:].any()
        valid, a, gr = mask[r, :T], adv[r, :T], g[r, :T]
        if not ca.has_repair[i]:
            torch.testing.assert_close(a[valid], ca.seq_advantages[i].expand(int(valid.sum())))
            continue
        m = ca.masks[i] & valid
        expected = torch.where(m, ca.seq_advantages[i].clamp(max=0), 0.0)  # sign-guarded, edited tokens only
        torch.testing.assert_close(a[valid], expected[valid])
        assert (gr[valid & ~m] == 0).all(), "an unedited token of a repaired sample got gradient"
        if ca.seq_advantages[i] < 0 and m.any():
            edited_negative += 1
            assert (gr[m] != 0).all()
            if not fused:  # dapo on-policy: d loss / d logp_t = -A_t / (tokens of the generation batch)
                torch.testing.assert_close(gr[m], -a[m] / seen["num_items_in_batch"])
    assert edited_negative > 0
    assert logs[0]["credit/repair_success"] == 1.0 and logs[0]["credit/repair_rows"] > 0
    for key in ("credit/active_tokens", "credit/edit_distance", "credit/phi", "credit/rejected_repairs"):
        assert key in logs[0]


def test_ibpo_both_losses_agree(model_dir):
    runs = [
        train(
            CreditGRPOTrainer,
            model_dir,
            config(model_dir, max_steps=3),
            credit=CreditConfig(algorithm="ibpo"),
            reviser=OracleReviser(fix_prefix),
            use_credit_ops_loss=fused,
        )[1]
        for fused in (False, True)
    ]
    for a, b in zip(*runs, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]


# ---- a few steps of every algorithm
ALGORITHM_RUNS = {
    "grpo": dict(credit=CreditConfig(algorithm="grpo"), args=dict(loss_type="grpo")),
    "dapo": dict(credit=CreditConfig(algorithm="dapo"), fused=True),
    "dr_grpo": dict(credit=CreditConfig(algorithm="dr_grpo"), args=dict(loss_type="dr_grpo", scale_rewards="none")),
    "ibpo": dict(credit=CreditConfig(algorithm="ibpo"), reviser=lambda d: OracleReviser(fix_prefix)),
    "diff_feedback-step-policy": dict(
        credit=CreditConfig(algorithm="diff_feedback", granularity="step", delimiter="+", max_edit_ratio=1.0),
        reviser=lambda d: PolicyReviser(),
        args=dict(gradient_checkpointing=True),
    ),
    "iop-gated-external": dict(
        credit=CreditConfig(algorithm="iop", k=1, max_edit_ratio=1.0),
        reviser=lambda d: ExternalReviser(Qwen2ForCausalLM.from_pretrained(d), char_tokenizer(), max_new_tokens=8),
        args=dict(importance_sampling_level="sequence", loss_type="dapo", epsilon=3e-4, epsilon_high=4e-4),
        fused=True,
    ),
}


@pytest.mark.parametrize("name", list(ALGORITHM_RUNS))
def test_algorithm_runs(model_dir, name):
    spec = ALGORITHM_RUNS[name]
    reviser = spec["reviser"](model_dir) if "reviser" in spec else None
    trainer, logs = train(
        CreditGRPOTrainer,
        model_dir,
        config(model_dir, max_steps=2, **spec.get("args", {})),
        credit=spec["credit"],
        reviser=reviser,
        use_credit_ops_loss=spec.get("fused", False),
    )
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor([h["loss"], h["grad_norm"]])).all() for h in logs)
    if spec["credit"].uses_repairs:
        assert logs[-1]["credit/revisions"] > 0 and "credit/repair_success" in logs[-1]
    if name.startswith("iop"):
        assert trainer._gated_ratio  # IOP's gated GSPO ratio through the credit loss
        assert (trainer.credit_last.gates[~trainer.credit_last.wrong] == 0).all()  # correct samples out of the loss


# ---- bad input: a clear error, nothing trained
def test_unsupported_trl_options_with_credit_loss(model_dir):
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        CreditGRPOTrainer(
            model=model_dir,
            reward_funcs=reward,
            args=config(model_dir, loss_type="sapo"),
            train_dataset=dataset(),
            processing_class=char_tokenizer(),
            credit=CreditConfig(algorithm="grpo"),
            use_credit_ops_loss=True,
        )
    with pytest.raises(ValueError, match="top_entropy_quantile.*use_bias_correction_kl"):
        CreditGRPOTrainer(
            model=model_dir,
            reward_funcs=reward,
            args=config(model_dir, top_entropy_quantile=0.5, beta=0.1),
            train_dataset=dataset(),
            processing_class=char_tokenizer(),
            credit=CreditConfig(algorithm="grpo"),
            use_credit_ops_loss=True,
        )


@pytest.mark.parametrize(
    "args, credit, match",
    [
        (dict(loss_type="grpo"), CreditConfig(algorithm="ibpo"), r"train_on_repair=True\) needs a token-mean loss"),
        (dict(importance_sampling_level="sequence"), CreditConfig(algorithm="iop"), "use_credit_ops_loss=True"),
        (dict(), CreditConfig(algorithm="dr_grpo"), "scale_rewards='none'"),
        (dict(multi_objective_aggregation="normalize_then_sum"), CreditConfig(algorithm="grpo"), "normalize_then_sum"),
    ],
    ids=["train-on-repair-grpo", "iop-gated-trl-loss", "dr_grpo-scale", "normalize-then-sum"],
)
def test_contradicting_options_raise(model_dir, args, credit, match):
    with pytest.raises(ValueError, match=match):
        CreditGRPOTrainer(
            model=model_dir,
            reward_funcs=reward,
            args=config(model_dir, **args),
            train_dataset=dataset(),
            processing_class=char_tokenizer(),
            credit=credit,
            reviser=OracleReviser(fix_prefix) if credit.uses_repairs else None,
        )


def test_bad_credit_config_and_trl_version(model_dir, monkeypatch):
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        CreditConfig(algorithm="ppo")
    with pytest.raises(ValueError, match="granularity='step' needs delimiter"):
        CreditConfig(granularity="step")
    monkeypatch.setattr(ctrl.trl, "__version__", "1.15.0")
    with pytest.raises(RuntimeError, match=r"TRL >= 1\.16\.0, < 1\.17\.0"):
        CreditGRPOTrainer(model=model_dir, reward_funcs=reward, args=config(model_dir), train_dataset=dataset())


@pytest.mark.parametrize(
    "reviser, error, match",
    [
        (lambda **kw: [], ValueError, "returned 0 entries for"),
        (lambda *, prompts, **kw: [7] * len(prompts), TypeError, "holds a int"),
        (lambda *, prompts, **kw: [["ok", None]] * len(prompts), TypeError, "holds a NoneType"),
    ],
    ids=["wrong-count", "not-a-string", "list-with-none"],
)
def test_bad_reviser_output_trains_nothing(model_dir, reviser, error, match):
    trainer = CreditGRPOTrainer(
        model=model_dir,
        reward_funcs=reward,
        args=config(model_dir),
        train_dataset=dataset(),
        processing_class=char_tokenizer(),
        credit=CreditConfig(algorithm="ibpo"),
        reviser=reviser,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(error, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


# ---- the example, one step
def test_example_runs(model_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_ibpo", os.path.join(ROOT, "examples", "trl_ibpo.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(warm_steps=10, rl_steps=1, out_dir=os.path.join(model_dir, "example"))
    assert summary["steps"] == 1 and "credit/repair_success" in summary["last"]


# ---- two processes on the CPU (torchrun: accelerate 1.15's `launch --cpu` starts one process without mpirun)
TWO_PROCESS = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import test_integrations_trl as t
    from credit_ops.integrations.trl import CreditConfig, CreditGRPOTrainer, OracleReviser
    from trl import GRPOTrainer

    class Check(CreditGRPOTrainer):
        # algorithm="grpo": the credit advantages of this process's rows are TRL's own (gathered) ones
        def _assign_credit(self, out, batch):
            stock = out["advantages"].clone()
            out = super()._assign_credit(out, batch)
            if self.credit.algorithm == "grpo":
                valid = out["completion_mask"].bool()
                torch.testing.assert_close(out["advantages"][valid], stock.unsqueeze(1).expand_as(valid)[valid])
                self.checked = getattr(self, "checked", 0) + 1
            return out

    # 6 rows per process, groups of 4: the second group straddles the two processes
    args = dict(per_device_train_batch_size=6, max_steps=2)
    tr, logs = t.train(Check, {model!r}, t.config({model!r}, **args), credit=CreditConfig(algorithm="grpo"))
    assert tr.checked == 2
    tr, logs = t.train(Check, {model!r}, t.config({model!r}, **args), credit=CreditConfig(algorithm="ibpo"),
                       reviser=OracleReviser(t.fix_prefix), use_credit_ops_loss=True)
    assert logs[-1]["credit/revisions"] > 0 and tr.accelerator.num_processes == 2
    # DDP averaged the gradients (the credit loss runs inside the wrapper's forward): the replicas stay equal
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    both = tr.accelerator.gather(flat.unsqueeze(0))
    assert torch.equal(both[0], both[1]) and not torch.equal(flat, t.initial_parameters({model!r}))
    print("rank", tr.accelerator.process_index, "ok", logs[-1]["loss"], logs[-1]["credit/repair_rows"], flush=True)
    """
)


@pytest.mark.slow
def test_two_processes_cpu(model_dir, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS.format(tests=os.path.join(ROOT, "tests"), model=model_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        str(script),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count(" ok ") == 2
