"""IBPO inside TRL: credit_ops.integrations.trl.CreditGRPOTrainer with a task-oracle reviser, offline on the CPU.

    python examples/trl_ibpo.py                 # about a minute on 2 cores
    python examples/trl_ibpo.py --fused         # the loss through credit_ops.fused_linear_policy_loss

The task is the project's step-structured arithmetic ("7+5-3=" -> "7+5=12;12-3=9;#9"). A tiny Qwen2 model, built
from a config with the project's character tokenizer, is first fine-tuned for a few seconds on noisy worked
solutions (each step slips with probability 0.3), so that it makes step errors: the regime IBPO is about. Then
TRL's GRPO loop runs with IBPO credit: every wrong completion is repaired by the task oracle (keep the correct
steps, rewrite from the first wrong one), the repair is verified by the same reward function, and only the edited
tokens of the wrong completion get (negative) credit, while the repair joins the loss with positive credit on its
edits. Nothing is downloaded.
"""

import argparse
import math
import os
import tempfile

import torch
from credit_ops.trainer.modeling import char_tokenizer
from credit_ops.trainer.tasks import ArithTask, Problem, oracle_repair
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

from credit_ops.integrations.trl import CreditConfig, CreditGRPOTrainer, OracleReviser

TASK = ArithTask(n_terms=3, max_value=9, slip_prob=0.3)


def problems(n: int, seed: int) -> list[Problem]:
    return TASK.sample(n, torch.Generator().manual_seed(seed))


def correctness(completions, answer, **kw) -> list[float]:
    """TRL reward function: 1 for the right final answer (the task's own scorer)."""
    return [TASK.score(Problem("", a), c) for c, a in zip(completions, answer, strict=True)]


def oracle(prompt, completion, answer, steps, **row) -> str | None:
    """The task oracle as a reviser: the minimal repair of a completion with checkable steps."""
    return oracle_repair(Problem(prompt, answer, steps, TASK.delimiter), completion)


def warm_start(model, tok, steps: int, seed: int = 0) -> None:
    """A few seconds of supervised fine-tuning on noisy worked solutions (TRL tokenises prompts without BOS)."""
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows, labels = [], []
        for p in TASK.sample(32, gen):
            prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
            target = tok(TASK.demonstration(p, gen), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        T = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
        lab = torch.tensor([r + [-100] * (T - len(r)) for r in labels])
        attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        loss = model(input_ids=ids, attention_mask=attn, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(warm_steps: int = 300, rl_steps: int = 20, fused: bool = False, out_dir: str | None = None) -> dict:
    torch.manual_seed(0)
    out_dir = out_dir or tempfile.mkdtemp(prefix="trl_ibpo_")
    tok = char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    warm_start(model, tok, warm_steps)
    model.save_pretrained(os.path.join(out_dir, "warm"))  # TRL loads the policy (and any reference) from a path
    tok.save_pretrained(os.path.join(out_dir, "warm"))

    rows = [{"prompt": p.prompt, "answer": p.answer, "steps": p.steps} for p in problems(256, seed=1)]
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, "grpo"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=16,  # 4 prompts x 4 completions per step
        num_generations=4,
        max_completion_length=24,
        temperature=1.0,
        learning_rate=2e-4,
        max_steps=rl_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = CreditGRPOTrainer(
        model=os.path.join(out_dir, "warm"),
        reward_funcs=correctness,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        credit=CreditConfig(algorithm="ibpo"),  # every other flag: the defaults of docs/method.md
        reviser=OracleReviser(oracle),
        use_credit_ops_loss=fused,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    print(f"{'step':>4} {'reward':>6} {'loss':>8} {'repair ok':>9} {'active':>6} {'edit d':>6} {'phi':>5} {'rows':>4}")
    for i, h in enumerate(logs, 1):
        print(
            f"{i:4d} {h['reward']:6.3f} {h['loss']:8.4f} {h.get('credit/repair_success', 0):9.2f} "
            f"{h['credit/active_tokens']:6.3f} {h.get('credit/edit_distance', 0):6.2f} {h.get('credit/phi', 0):5.2f} "
            f"{h.get('credit/repair_rows', 0):4.0f}"
        )
    return {"steps": len(logs), "last": logs[-1] if logs else {}, "out_dir": out_dir}


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fused", action="store_true", help="use credit_ops.fused_linear_policy_loss")
    parser.add_argument("--out-dir", default=None)
    a = parser.parse_args()
    main(a.warm_steps, a.steps, a.fused, a.out_dir)
