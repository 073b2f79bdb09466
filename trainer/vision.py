"""Vision-language models: the embedded tiny Qwen2-VL, local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, and
the processor that turns (text, image) into the trainer's rows.

All three Qwen-VL generations take the same batch, so one code path serves the tiny CI model and real checkpoints:

    input_ids          (N, T)   the prompt holds <|vision_start|> <|image_pad|> * n <|vision_end|>, n = the
                                image's grid_t * grid_h * grid_w / merge_size**2 (one token per merged patch cell)
    mm_token_type_ids  (N, T)   1 on <|image_pad|> tokens, 0 elsewhere (completions included)
    pixel_values       (sum of the rows' patches, 3 * temporal_patch * patch**2)   flat over all rows' images
    image_grid_thw     (N, 3)   one image per row
    position_ids       none: the model computes its 3-D mrope positions from attention_mask, mm_token_type_ids and
                       image_grid_thw (the text path's 1-D cumsum would be wrong for the image block)

Selecting rows of such a batch regathers the pixel blocks by image_grid_thw.prod(-1) (rollout.Packed.rows).
The official Qwen2VLProcessor cannot be built without torchvision (its video processor needs it), so
`VisionProcessor` builds the same rows from the tokenizer and transformers' PIL image processor; a test checks it
field by field against the official one where torchvision is installed. Nothing here downloads anything.

A tokenizer that belongs to a VLM carries its processor as `tokenizer.vision` (set by `build_vlm`): generation,
revision prompts and packing find it there.
"""

import base64
import copy
import io
import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .modeling import (
    char_tokenizer,
    decoder_config,
    encode_prompt,
    load_cached,
    save_cached,
    set_warm_lr,
    warm_cache_path,
    warm_seed,
)

SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TINY_ARCH = "qwen2_vl"
# The tiny model's image geometry: 8 px patches merged 2x2, so each 16x16 cell is one image token.
PATCH, MERGE, TEMPORAL = 8, 2, 2


@dataclass(frozen=True)
class Pixels:
    """One image as the model takes it: its patches and grid, and the id its prompt block is made of."""

    pixel_values: Tensor  # (grid_t * grid_h * grid_w, 3 * TEMPORAL * PATCH**2) fp32
    grid_thw: Tensor  # (3,) long
    token_id: int  # the <|image_pad|> id
    n_tokens: int  # its <|image_pad|> tokens in the prompt: grid_t * grid_h * grid_w / merge_size**2

    @property
    def n_patches(self) -> int:
        return int(self.grid_thw.prod())


def vlm_tokenizer():
    """The character tokenizer (modeling.char_tokenizer, same ids) plus the four Qwen-VL vision specials after it;
    `decode(skip_special_tokens=True)` drops them."""
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    return tok


def is_vlm_dir(path: str) -> bool:
    """Whether a local model directory holds a vision-language model (its config.json has a vision_config)."""
    p = os.path.join(path, "config.json")
    if not os.path.exists(p):
        return False
    with open(p) as f:
        return "vision_config" in json.load(f)


def is_vlm(cfg) -> bool:
    """Whether the run's policy is a VLM: the embedded tiny Qwen2-VL or a local VLM checkpoint."""
    return is_vlm_dir(cfg.model.path) if cfg.model.path else cfg.model.arch == TINY_ARCH


class VisionProcessor:
    """(text, PIL image) -> prompt ids with the image block, and the image's patches (`Pixels`).

    `encode(texts, images)` returns the whole left-padded batch, the fields Qwen2VLProcessor returns.
    With a chat template (real checkpoints) the prompt is the user turn [image, text] rendered by the template;
    otherwise (the tiny model) <bos> <|vision_start|> <|image_pad|>*n <|vision_end|> text.
    """

    def __init__(self, tokenizer, image_processor):
        self.tok, self.ip = tokenizer, image_processor
        ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
        missing = [s for s, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"the tokenizer has no vision special tokens {missing}: not a Qwen-VL tokenizer")
        self.image_token_id = ids["<|image_pad|>"]
        self.vision_start_id, self.vision_end_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.merge = int(image_processor.merge_size)
        # never sampled: a vision special in a completion breaks the next forward (image-token count mismatch)
        self.suppress_ids = sorted(
            {*ids.values(), tokenizer.pad_token_id, *([tokenizer.bos_token_id] if tokenizer.bos_token_id else [])}
            - {tokenizer.eos_token_id}
        )

    def image(self, img) -> Pixels:
        """A PIL image -> its patches (n, D) and grid (3,), resized by the image processor's smart_resize."""
        out = self.ip(images=[img.convert("RGB")], return_tensors="pt")
        thw = out["image_grid_thw"][0]
        return Pixels(out["pixel_values"], thw, self.image_token_id, int(thw.prod()) // self.merge**2)

    def prompt_ids(self, text: str, image: Pixels) -> list[int]:
        """Prompt ids for one (text, image): the image block expanded to image.n_tokens pad tokens."""
        n = image.n_tokens
        if getattr(self.tok, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": text}]
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5
            if ids.count(self.image_token_id) != 1:
                raise ValueError(
                    f"the chat template rendered {ids.count(self.image_token_id)} <|image_pad|> tokens for one image"
                )
            k = ids.index(self.image_token_id)
            return ids[:k] + [self.image_token_id] * n + ids[k + 1 :]
        body = self.tok(text, add_special_tokens=False)["input_ids"]
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + [self.vision_start_id] + [self.image_token_id] * n + [self.vision_end_id] + body

    def encode(self, texts: list[str], images) -> dict:
        """The batch Qwen2VLProcessor(text=..., images=...) returns for one image per text, left-padded:
        input_ids, attention_mask, mm_token_type_ids (B, T) long; pixel_values (sum patches, D); image_grid_thw
        (B, 3)."""
        ims = [self.image(im) for im in images]
        rows = [self.prompt_ids(t, im) for t, im in zip(texts, ims, strict=True)]
        T = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
        attn = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        return dict(
            input_ids=ids,
            attention_mask=attn,
            mm_token_type_ids=(ids == self.image_token_id).long(),
            **stack_images(ims),
        )


def stack_images(images: list[Pixels], device=None) -> dict:
    """Rows' images as the model takes them: pixel_values (sum of patches, D) flat, image_grid_thw (n, 3)."""
    pv = torch.cat([im.pixel_values for im in images])
    thw = torch.stack([im.grid_thw for im in images])
    return dict(pixel_values=pv.to(device) if device else pv, image_grid_thw=thw.to(device) if device else thw)


def check_image_tokens(input_ids: Tensor, images: list[Pixels]) -> None:
    """Each row must hold exactly its image's number of <|image_pad|> tokens (else the model fails deep inside)."""
    for i, (row, im) in enumerate(zip(input_ids.tolist(), images, strict=True)):
        got, want = row.count(im.token_id), im.n_tokens
        if got != want:
            raise ValueError(
                f"row {i}: {got} image tokens in the prompt, but its image has {want} (grid {im.grid_thw.tolist()})"
            )


def prompt_inputs(tokenizer, problems, texts: list[str] | None = None):
    """Prompt ids of each problem (texts[i] in place of problems[i].prompt when given) and, for a VLM tokenizer
    and problems with images, each prompt's `Pixels` (else None). A text tokenizer with image problems is an
    error: the answer would depend on an image the model never sees."""
    texts = texts if texts is not None else [p.prompt for p in problems]
    has_image = [getattr(p, "image", None) is not None for p in problems]
    vp = getattr(tokenizer, "vision", None)
    if not any(has_image):
        return [encode_prompt(tokenizer, t) for t in texts], None
    if vp is None:
        raise ValueError("problems with images need a vision-language model (model.arch=qwen2_vl or a VLM model.path)")
    if not all(has_image):
        raise ValueError("every problem of a visual task needs an image")
    images = [image_of(p, vp) for p in problems]
    return [vp.prompt_ids(t, im) for t, im in zip(texts, images, strict=True)], images


def image_of(problem, vp: VisionProcessor) -> Pixels:
    """The problem's image as model input, processed once and kept on the problem (a repair reuses it)."""
    cached = getattr(problem, "_pixels", None)
    if cached is None or cached.token_id != vp.image_token_id:
        cached = vp.image(problem.image)
        problem._pixels = cached
    return cached


def generate_kwargs(tokenizer, input_ids: Tensor, images: list[Pixels]) -> dict:
    """Extra `generate` arguments for a batch of prompts with one image each: the image tensors,
    mm_token_type_ids, and the vision specials suppressed. No position_ids: the model's mrope."""
    vp = tokenizer.vision
    check_image_tokens(input_ids, images)
    return dict(
        **stack_images(images, input_ids.device),
        mm_token_type_ids=(input_ids == vp.image_token_id).long(),
        suppress_tokens=vp.suppress_ids,
    )


# ---- models
def tiny_vlm(cfg, tokenizer):
    """A tiny random Qwen2-VL (about 0.5 M parameters at the defaults) sized by cfg.model.{n_layer, d_model,
    n_head}: the vision tower has 2 blocks of width 64 over 8 px patches, merged 2x2 into d_model."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    m = cfg.model
    head_dim = m.d_model // m.n_head
    if head_dim % 6:
        raise ValueError(f"model.d_model / model.n_head = {head_dim} must be divisible by 6 (3 mrope sections)")
    sec = head_dim // 6
    text = dict(
        decoder_config(cfg, tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [sec, sec, sec]},
    )
    vision = dict(
        depth=2,
        embed_dim=64,
        hidden_size=m.d_model,
        mlp_ratio=2,
        num_heads=4,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
    )
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_image_processor():
    """The tiny model's image processor (PIL backend, no torchvision): 8 px patches, 2x2 merge, images kept
    between 16x16 and 64x64 pixels (a 48x16 image stays 48x16: 12 patches, 3 image tokens)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=16 * 16,
        max_pixels=64 * 64,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def load_vlm(path: str, dtype=torch.float32):
    """A local Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory: model, tokenizer (left padding, `.vision` set).
    AutoProcessor is not used: it needs torchvision (for the video processor); the image processor alone does
    not. Never downloads."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):  # Qwen-VL keeps the template in the processor's files
        for name in ("chat_template.jinja", "chat_template.json"):
            p = os.path.join(path, name)
            if os.path.exists(p):
                with open(p) as f:
                    tok.chat_template = f.read() if name.endswith("jinja") else json.load(f)["chat_template"]
                break
    tok.vision = VisionProcessor(tok, AutoImageProcessor.from_pretrained(path, local_files_only=True))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def freeze_vision(model) -> int:
    """Freeze the vision tower (patch embedding, blocks and merger): it gets no gradient and no optimizer
    update. Returns the number of frozen parameters."""
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "visual") else model
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise ValueError(f"model.freeze_vision: {type(model).__name__} has no vision tower (.visual)")
    visual.requires_grad_(False)
    return sum(p.numel() for p in visual.parameters())


def build_vlm(cfg, task, log=print):
    """(model, tokenizer) of a VLM run: a local checkpoint, or the tiny Qwen2-VL after its (cached) warm start;
    the vision tower frozen with model.freeze_vision."""
    from accelerate.utils import set_seed

    if cfg.model.path:
        model, tok = load_vlm(cfg.model.path)
    else:
        tok = vlm_tokenizer()
        tok.vision = VisionProcessor(tok, tiny_image_processor())
        set_seed(warm_seed(cfg))  # the initial weights
        model = tiny_vlm(cfg, tok)
        vlm_warm_start(model, tok, task, cfg, log=log)
    if cfg.model.freeze_vision:
        log(f"vision tower frozen: {freeze_vision(model):,} parameters")
    return model, tok


# ---- supervised warm start
def sft_batch(tokenizer, problems, completions: list[str], texts: list[str] | None = None) -> dict:
    """(problem with image, completion) pairs -> a right-padded batch: input_ids, attention_mask,
    mm_token_type_ids, labels (B, T) (prompt and padding -100), pixel_values, image_grid_thw. texts: prompt texts
    in place of the problems' prompts (revision prompts), each still with its problem's image."""
    prompts, images = prompt_inputs(tokenizer, problems, texts)
    rows, lab = [], []
    for p, c in zip(prompts, completions, strict=True):
        c = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        lab.append([-100] * len(p) + c)
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    return dict(
        input_ids=ids,
        attention_mask=torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]),
        mm_token_type_ids=(ids == tokenizer.vision.image_token_id).long(),
        labels=torch.tensor([r + [-100] * (T - len(r)) for r in lab]),
        **stack_images(images),
    )


def vlm_warm_start(model, tokenizer, task, cfg, log=print):
    """Supervised fine-tuning of the tiny VLM on the task's (noisy) demonstrations with their images, so RL
    starts from non-zero accuracy; with a task that says what its image tokens show (image_token_text) plus the
    projector-alignment term, and with revise.reviser=policy plus cfg.warm_start.revision_batch_size revision
    examples a step (revise.revision_prompt with the image, target the oracle's minimal repair). Cached like the
    text warm start (keyed by the model/task/warm-start config, seed and revision format, `vlm_warm_<key>.pt`
    under cfg.warm_start.cache_dir)."""
    w = cfg.warm_start
    if w.steps <= 0:
        return model
    from .revise import REFERENCE_LINE, REVISION_PROMPT, revision_prompt

    # the policy reviser needs the revision mode: wrong attempts and references -> minimal repairs, image included
    revise = cfg.uses_repairs and cfg.revise.reviser == "policy" and task.checkable and w.revision_batch_size > 0
    key_cfg = copy.deepcopy(cfg)
    key_cfg.model.freeze_vision = False  # the warm start trains the whole model either way: one cache entry
    path = warm_cache_path(key_cfg, "vlm_warm", REVISION_PROMPT + REFERENCE_LINE if revise else "")
    if load_cached(model, path, log):
        return model
    gen = torch.Generator().manual_seed(warm_seed(cfg) + 7919)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    align = hasattr(task, "image_token_text")
    model.train()
    for step in range(w.steps):
        set_warm_lr(opt, w, step)
        probs = task.sample(w.batch_size, gen)
        batch = sft_batch(tokenizer, probs, [task.demonstration(p, gen) for p in probs])
        loss = model(**batch, use_cache=False).loss
        if revise:
            rev = task.sample(w.revision_batch_size, gen)
            attempts = [task.wrong_attempt(p, gen) for p in rev]
            refs = [None if float(torch.rand((), generator=gen)) < 0.25 else task.demonstration(p, gen) for p in rev]
            texts = [revision_prompt(p.prompt, a, r) for p, a, r in zip(rev, attempts, refs, strict=True)]
            fixed = [task.repair(p, a) or p.solution for p, a in zip(rev, attempts, strict=True)]
            loss = loss + model(**sft_batch(tokenizer, rev, fixed, texts), use_cache=False).loss
        if align:
            loss = loss + alignment_loss(model, tokenizer, task, probs, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, w.steps // 5) == 0 or step == w.steps - 1:
            log(f"warm start {step + 1}/{w.steps}: loss {loss.item():.3f}")
    model.eval()
    save_cached(model, path)
    return model


def alignment_loss(model, tokenizer, task, problems, batch) -> Tensor:
    """The projector-alignment term of the warm start (as LLaVA's first stage): each image token's feature, read
    through the (tied) LM head, should predict the text it shows (task.image_token_text, e.g. the digit in its
    cell). Image tokens then look like the text tokens they depict, and the language model can copy them (measured
    on the digit task: without it the tiny model read no digit after 800 steps; with it, reading appears after
    300-600). () mean cross-entropy."""
    feats = model.model.get_image_features(
        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
    ).pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats  # (image tokens, H)
    target = [tokenizer.convert_tokens_to_ids(c) for p in problems for c in task.image_token_text(p)]
    if len(target) != feats.shape[0]:
        raise ValueError(f"task.image_token_text gives {len(target)} labels for {feats.shape[0]} image tokens")
    logits = model.get_output_embeddings()(feats)  # (image tokens, V)
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(target, device=logits.device))


def image_data_uri(img) -> str:
    """A PIL image as a base64 PNG data URI (for report.html)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_view(problem) -> dict:
    """{"image": data URI} for a problem with an image (the report shows it beside the group), else {}."""
    img = getattr(problem, "image", None)
    return {} if img is None else {"image": image_data_uri(img)}
