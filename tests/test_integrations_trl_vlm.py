"""credit_ops.integrations.trl on a vision-language model: CreditGRPOTrainer with images (TRL's "image" column).

Offline and on the CPU: the project's tiny Qwen2-VL (trainer/vision.py, built from a config with random weights,
saved to a temporary directory) on a few rows of the 7-segment digit task (trainer/visual_task.py, images drawn with
PIL). TRL's VLM path needs a ProcessorMixin (it checks the class, calls apply_chat_template, __call__(images=, text=)
and batch_decode). The official Qwen2VLProcessor cannot be built without torchvision (its video processor needs it),
so the test uses the official class with the video processor left out (ImageOnlyQwen2VLProcessor: its own __call__,
image-token expansion and mm_token_type_ids, on the PIL image processor), checked equal field by field to the
project's VisionProcessor. fp32, one torch thread.
"""

import math
import os
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(
        f"credit_ops.integrations.trl is tested with trl 1.16.x, found {trl.__version__}", allow_module_level=True
    )

from credit_ops.trainer.tasks import Problem, extract_answer, oracle_repair  # noqa: E402
from credit_ops.trainer.vision import VisionProcessor, tiny_image_processor, tiny_vlm, vlm_tokenizer  # noqa: E402
from credit_ops.trainer.visual_task import DigitTask  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from credit_ops.integrations.trl import (  # noqa: E402
    CreditConfig,
    CreditGRPOTrainer,
    ExternalReviser,
    OracleReviser,
    PolicyReviser,
)

# The tiny model's prompt layout (VisionProcessor's, without a chat template): <bos> <|vision_start|> <|image_pad|>
# <|vision_end|> text; the processor expands the one <|image_pad|> to the image's token count.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """transformers' Qwen2VLProcessor without its video processor (ProcessorMixin takes its sub-processors from the
    __init__ signature), so it builds without torchvision; images only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def processor():
    return ImageOnlyQwen2VLProcessor(tiny_image_processor(), vlm_tokenizer(), chat_template=TEMPLATE)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """The tiny Qwen2-VL (d=48, 2 layers; about 0.25 M parameters) saved for TRL (which loads it, and its reference
    model, from the path)."""
    torch.manual_seed(0)
    cfg = SimpleNamespace(model=SimpleNamespace(n_layer=2, d_model=48, n_head=2, max_positions=128))
    path = str(tmp_path_factory.mktemp("tiny_vlm"))
    tiny_vlm(cfg, vlm_tokenizer()).save_pretrained(path)
    return path


def problems(n):
    return DigitTask().sample(n, torch.Generator().manual_seed(0))


def dataset(n=8, distinct=False):
    """n rows of the digit task; distinct: rows with different prompts (there are 4: A+B+C=, A+B-C=, ...)."""
    probs = problems(n)
    if distinct:
        probs = list({p.prompt: p for p in reversed(problems(16))}.values())[:n]
        assert len(probs) == n
    rows = [
        {"prompt": [{"role": "user", "content": p.prompt}], "image": p.image, "answer": p.answer, "steps": p.steps}
        for p in probs
    ]
    return Dataset.from_list(rows)


def text(c) -> str:
    return c[0]["content"]


def reward(completions, answer, **kw):
    """1 for the right final answer, plus a little per digit (so groups have a spread)."""
    return [
        float(extract_answer(text(c)) == a) + 0.01 * sum(ch.isdigit() for ch in text(c))
        for c, a in zip(completions, answer, strict=True)
    ]


ORACLE_IMAGES = []


def fix(prompt, completion, answer, steps, image=None, **row):
    """The task oracle (tasks.oracle_repair: keep the correct steps, rewrite from the first wrong one). It needs no
    image; it gets the row's image column all the same."""
    ORACLE_IMAGES.append(image)
    return oracle_repair(Problem("", answer, steps), completion)


def config(vlm_dir, **kw):
    base = dict(
        output_dir=os.path.join(vlm_dir, "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=2,
        learning_rate=1e-2,
        seed=0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
        adam_epsilon=1e-4,  # as in tests/test_integrations_trl.py (fp32 vs float64 group statistics)
    )
    return GRPOConfig(**{**base, **kw})


def train(cls, vlm_dir, args, n_rows=8, distinct=False, **kw):
    data = dataset(n_rows, distinct)
    trainer = cls(model=vlm_dir, reward_funcs=reward, args=args, train_dataset=data, processing_class=processor(), **kw)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "grad_norm" in h]


def test_processor_matches_vision_processor():
    """The processor TRL gets builds the rows the project's VisionProcessor builds (ids, masks, pixels, grids)."""
    probs = problems(3)
    proc = processor()
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.prompt}]}] for p in probs]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    got = proc(images=[[p.image] for p in probs], text=texts, padding=True, return_tensors="pt")
    want = VisionProcessor(proc.tokenizer, tiny_image_processor()).encode(
        [p.prompt for p in probs], [p.image for p in probs]
    )
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert int((got["input_ids"] == proc.image_token_id).sum()) == 3 * 3  # 48x16 px: 3 image tokens per image


# ---- parity: algorithm="grpo" on images is TRL's GRPO, with TRL's loss and with credit_ops' fused loss
@pytest.mark.parametrize("fused", [False, True])
def test_grpo_parity_with_stock_trainer_on_images(vlm_dir, fused):
    """Two optimizer steps (one generation batch split in two: the old log-probs are computed, with the images)."""
    args = dict(steps_per_generation=2, epsilon_high=0.28)
    _, stock = train(GRPOTrainer, vlm_dir, config(vlm_dir, **args))
    _, ours = train(
        CreditGRPOTrainer,
        vlm_dir,
        config(vlm_dir, **args),
        credit=CreditConfig(algorithm="grpo"),
        use_credit_ops_loss=fused,
    )
    assert len(ours) == len(stock) == 2
    for a, b in zip(stock, ours, strict=True):
        assert a["grad_norm"] > 0
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (fused, a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (fused, a["grad_norm"], b["grad_norm"])
        for key in ("entropy", "clip_ratio/region_mean", "reward"):  # reward: on generation steps only
            if key not in a:
                continue
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (fused, key, a[key], b[key])


# ---- Difference Feedback with the oracle: repairs join the batch with their samples' images
class Probe(CreditGRPOTrainer):
    """Keeps each generation batch as _assign_credit hands it to TRL, with the rows' dataset inputs, and the
    log-probs of each repair row recomputed here with its own sample's image and with another group's image."""

    probes: list

    def _assign_credit(self, out, batch):
        out = super()._assign_credit(out, batch)
        entry = dict(inputs=batch["inputs"], out=dict(out), ca=self.credit_last)
        if "old_per_token_logps" in out:
            entry["logps"] = self._repair_logps(out, batch)
        self.probes = [*getattr(self, "probes", []), entry]
        return out

    @torch.no_grad()
    def _repair_logps(self, out, batch):
        ca, B = self.credit_last, len(batch["inputs"])
        src = ca.repair_of[ca.repair_selected].tolist()
        model = self.accelerator.unwrap_model(self.model)
        ip = self.processing_class.image_processor
        res = []
        for k, s in enumerate(src):
            ids = torch.cat([out["prompt_ids"][B + k], out["completion_ids"][B + k]])[None]
            attn = torch.cat([out["prompt_mask"][B + k], out["completion_mask"][B + k]])[None]
            P, C = out["prompt_ids"].shape[1], out["completion_ids"].shape[1]
            row = []
            for img in (batch["inputs"][s]["image"], batch["inputs"][(s + 4) % B]["image"]):  # own, another group's
                im = ip(images=[img], return_tensors="pt")
                logits = model(
                    input_ids=ids,
                    attention_mask=attn,
                    mm_token_type_ids=(ids == model.config.image_token_id).long(),
                    **im,
                    use_cache=False,
                ).logits[0, P - 1 : P + C - 1]
                row.append(torch.log_softmax(logits.float(), -1).gather(1, ids[0, P:, None])[:, 0])
            res.append(row)
        return res


@pytest.fixture(scope="module")
def diff_feedback_runs(vlm_dir):
    """2 steps of Difference Feedback with the task oracle, with TRL's loss and with credit_ops' fused loss: one
    generation batch of 16 rows split in two (so the old log-probs are computed), beta > 0 (the reference's too)."""
    runs = {}
    for fused in (False, True):
        ORACLE_IMAGES.clear()
        credit = CreditConfig(algorithm="diff_feedback", max_edit_ratio=100.0)  # a random policy: whole rewrites
        args = config(vlm_dir, steps_per_generation=2, beta=0.04, use_bias_correction_kl=False)
        trainer, logs = train(
            Probe, vlm_dir, args, credit=credit, reviser=OracleReviser(fix), use_credit_ops_loss=fused
        )
        runs[fused] = (trainer, logs, list(ORACLE_IMAGES))
    return runs


def test_diff_feedback_same_with_either_loss_on_images(diff_feedback_runs):
    """credit_ops' fused loss on the VLM's hidden states (images in context, repair rows included) gives TRL's loss
    and gradients."""
    (_, trl_logs, _), (_, fused_logs, _) = diff_feedback_runs[False], diff_feedback_runs[True]
    for a, b in zip(trl_logs, fused_logs, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
        assert abs(a["kl"] - b["kl"]) <= 1e-5 * max(1.0, abs(a["kl"]))


@pytest.mark.parametrize("fused", [False, True])
def test_diff_feedback_oracle_on_images(vlm_dir, diff_feedback_runs, fused):
    """Repairs happen, each repair row carries its sample's prompt and image (pixel block, grid, image tokens), its
    old and reference log-probs are taken with that image in context, the loss is finite and the weights move."""
    trainer, logs, oracle_images = diff_feedback_runs[fused]
    before = torch.cat([p.flatten() for p in Qwen2VLForConditionalGeneration.from_pretrained(vlm_dir).parameters()])
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["credit/revisions"] > 0 and logs[0]["credit/repair_rows"] > 0
    assert logs[0]["credit/repair_verified"] > 0
    assert oracle_images and all(im is not None for im in oracle_images)
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert not torch.equal(before, after)

    (probe,) = trainer.probes  # one generation batch for the two steps
    out, inputs, ca = probe["out"], probe["inputs"], probe["ca"]
    B = len(inputs)
    src = ca.repair_of[ca.repair_selected].tolist()
    assert len({s // 4 for s in src}) > 1  # repairs in several groups (prompts with different images)
    R = out["prompt_ids"].shape[0] - B
    assert R >= len(src) and R % 2 == 0  # padded to a multiple of steps_per_generation
    ip = trainer.processing_class.image_processor
    sizes = out["image_grid_thw"].prod(-1).tolist()
    blocks = torch.split(out["pixel_values"], sizes)
    assert out["num_images"] == [1] * (B + R) and len(sizes) == B + R
    P = out["prompt_ids"].shape[1]
    assert out["mm_token_type_ids"].shape == (B + R, P + out["completion_ids"].shape[1])
    for k, s in enumerate(src):
        own = ip(images=[inputs[s]["image"]], return_tensors="pt")
        assert torch.equal(blocks[B + k], own["pixel_values"]), (k, s)
        assert torch.equal(out["image_grid_thw"][B + k], own["image_grid_thw"][0])
        assert torch.equal(out["prompt_ids"][B + k], out["prompt_ids"][s])
        assert torch.equal(out["mm_token_type_ids"][B + k, :P], out["mm_token_type_ids"][s, :P])
        assert not out["mm_token_type_ids"][B + k, P:].any()
        # old log-probs of the repair row = a forward with its own image; another image gives other values
        valid = out["completion_mask"][B + k].bool()
        with_own, with_other = probe["logps"][k]
        for key in ("old_per_token_logps", "ref_per_token_logps"):  # before any update: policy = reference
            got = out[key][B + k]
            assert torch.allclose(got[valid], with_own[valid], atol=1e-5), (key, k, (got - with_own)[valid].abs().max())
        assert (with_other[valid] - with_own[valid]).abs().max() > 1e-4


def test_iop_gated_ratio_on_images(vlm_dir):
    """IOP's gated sequence ratio (credit_ops' gated_gspo loss on the VLM's hidden states) trains on images."""
    credit = CreditConfig(algorithm="iop", max_edit_ratio=100.0)
    args = config(vlm_dir, importance_sampling_level="sequence")
    trainer, logs = train(
        CreditGRPOTrainer, vlm_dir, args, credit=credit, reviser=OracleReviser(fix), use_credit_ops_loss=True
    )
    assert trainer._gated_ratio
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["credit/repair_rows"] > 0 for h in logs)


def test_policy_reviser_sees_the_image(vlm_dir):
    """PolicyReviser's revision prompts hold their sample's image and go through TRL's own image tokenisation and
    generation (one generation batch)."""
    seen = []

    class Spy(CreditGRPOTrainer):
        def _tokenize_prompts(self, prompts):
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            seen.append((prompts, images, fields))
            return prompt_ids, images, fields

    credit = CreditConfig(algorithm="ibpo", max_edit_ratio=100.0)
    trainer, logs = train(
        Spy, vlm_dir, config(vlm_dir, max_steps=1), n_rows=4, distinct=True, credit=credit, reviser=PolicyReviser()
    )
    assert math.isfinite(logs[0]["loss"])
    (samples, sample_images, _), (revisions, rev_images, rev_fields) = seen  # the batch's call, then the revisions'
    assert logs[0]["credit/revisions"] > 0 and len(revisions) >= 1
    owner = {im[0].tobytes(): j for j, im in enumerate(sample_images)}  # each sample's image (pixels)
    assert len(owner) == 2  # a batch of 8 rows holds 2 prompts (4 generations each), with different images
    assert len({samples[j][0]["content"][-1]["text"] for j in owner.values()}) == 2  # and different questions
    for prompt, images in zip(revisions, rev_images, strict=True):
        block, body = prompt[0]["content"]
        assert block["type"] == "image" and images == [block["image"]]
        j = owner[block["image"].tobytes()]  # the revision shows the image of the sample it revises
        question = next(p["text"] for p in samples[j][0]["content"] if p["type"] == "text")
        assert body["text"].startswith(question + "\nWrong attempt: "), (question, body["text"])
        assert "\nReference: " in body["text"]  # the project trainer's revision prompt, reference line included
    assert rev_fields["image_grid_thw"].shape[0] == len(revisions)


def test_external_reviser_refused_for_vlms(vlm_dir):
    tok = vlm_tokenizer()
    with pytest.raises(ValueError, match="ExternalReviser is text-only"):
        CreditGRPOTrainer(
            model=vlm_dir,
            reward_funcs=reward,
            args=config(vlm_dir),
            train_dataset=dataset(4),
            processing_class=processor(),
            credit=CreditConfig(algorithm="ibpo"),
            reviser=ExternalReviser(Qwen2VLForConditionalGeneration.from_pretrained(vlm_dir), tok),
        )
