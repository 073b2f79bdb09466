"""TRL's own GRPO loss against the TRL adapter's credit-ops loss (CreditGRPOTrainer(use_credit_ops_loss=True): the
fused LM head from the backbone's hidden states), forward + backward of one micro-batch, side by side, and their
bf16 parity: each loss's error against TRL's loss in fp32 must stay within 2x TRL's own bf16 error (the tolerance
rule of tests/test_policy_loss.py), gradients included.

CPU: a tiny Qwen2 (V = 512, d = 64; a smoke run in CI). GPU: V = 151936, d = 896, 2 layers, 8 x 512 completion
tokens in bf16 autocast (the LM head dominates, as in Qwen2.5-0.5B).
"""

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"the TRL adapter is tested with trl 1.16.x, found {trl.__version__}", allow_module_level=True)

from credit_ops.trainer.modeling import char_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from benchmarks.conftest import DEVICE, measure  # noqa: E402
from credit_ops.integrations.trl import CreditConfig, CreditGRPOTrainer  # noqa: E402

if DEVICE == "cuda":
    V, H, B, P, C = 151936, 896, 8, 32, 512
else:
    V, H, B, P, C = 512, 64, 4, 8, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tok = char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=2 * H,
        num_hidden_layers=2,
        num_attention_heads=max(1, H // 64),
        num_key_value_heads=max(1, H // 64),
        max_position_embeddings=P + C,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = str(tmp_path_factory.mktemp("bench_trl"))
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    args = GRPOConfig(
        output_dir=path + "/out",
        use_cpu=DEVICE == "cpu",
        bf16=False,
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=C,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        loss_type="dapo",
        beta=0.04,
        use_bias_correction_kl=False,
        epsilon_high=0.28,
    )
    trainer = CreditGRPOTrainer(
        model=path,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "1+1="}] * B),
        processing_class=tok,
        credit=CreditConfig(algorithm="grpo"),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this benchmark bypasses
    model = trainer.model.train()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(C // 2, C + 1, (B,), generator=g)
    inputs = dict(
        prompt_ids=torch.randint(4, V, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(4, V, (B, C), generator=g),
        completion_mask=(torch.arange(C) < lengths.unsqueeze(1)).long(),
        advantages=torch.randn(B, C, generator=g),
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, C)
    noise = lambda: 0.2 * torch.randn(B, C, generator=g).to(model.device)
    inputs["old_per_token_logps"] = logps + noise()
    inputs["ref_per_token_logps"] = logps + noise()
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    return trainer, model, inputs


def _loss_and_grad(trainer, model, inputs, credit_loss: bool, bf16: bool):
    trainer.use_credit_ops_loss = credit_loss
    model.zero_grad(set_to_none=True)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.detach().double(), torch.cat([p.grad.flatten().double() for p in model.parameters()])


@pytest.mark.parametrize("impl", ["trl", "credit_ops"])
def test_trl_loss(benchmark, setup, impl):
    trainer, model, inputs = setup
    bf16 = DEVICE == "cuda"
    credit = impl == "credit_ops"
    want_loss, want_grad = _loss_and_grad(trainer, model, inputs, credit_loss=False, bf16=False)  # TRL, fp32
    trl_loss, trl_grad = _loss_and_grad(trainer, model, inputs, credit_loss=False, bf16=bf16)
    loss, grad = _loss_and_grad(trainer, model, inputs, credit_loss=credit, bf16=bf16)
    loss_err, grad_err = (loss - want_loss).abs().item(), (grad - want_grad).abs().max().item()
    trl_loss_err, trl_grad_err = (trl_loss - want_loss).abs().item(), (trl_grad - want_grad).abs().max().item()
    # fp32 on the CPU: the two losses agree to rounding; bf16 on a GPU: within 2x TRL's own bf16 error
    floor = 1e-6 * max(1.0, want_loss.abs().item())
    assert loss_err <= 2 * trl_loss_err + floor, (loss_err, trl_loss_err)
    assert grad_err <= 2 * trl_grad_err + 1e-5 * want_grad.abs().max().item(), (grad_err, trl_grad_err)
    measure(
        benchmark,
        lambda: _loss_and_grad(trainer, model, inputs, credit_loss=credit, bf16=bf16),
        rounds=10 if DEVICE == "cuda" else 3,
        impl=impl,
        tokens=B * C,
        vocab=V,
        loss_err_vs_fp32=loss_err,
        grad_err_vs_fp32=grad_err,
    )
