"""Rollout: batched sampling with transformers `generate`, and the packed batch the loss consumes.

Layout of every training row (samples and repairs alike): the prompt left-padded to P, the completion
right-padded to C, so completion token j sits at column P + j and is scored by the logits at column P + j - 1.

    input_ids      (N, P + C)
    attention_mask (N, P + C)   1 on real tokens
    position_ids   (N, P + C)   cumsum(attention_mask) - 1: the positions `generate` used (None for VLM rows)
    completion     (N, C)       completion ids, pad after the end
    labels         (N, C)       completion ids, -100 after the end (the loss's ignore_index)

VLM rows (trainer/vision.py) also carry their images: pixel_values flat over the rows' patches, image_grid_thw
(N, 3) and mm_token_type_ids (N, P + C); their position_ids are None, so the model computes its mrope positions.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

import credit_ops

from .vision import prompt_inputs


@dataclass
class Packed:
    input_ids: Tensor  # (N, P + C)
    attention_mask: Tensor  # (N, P + C)
    position_ids: Tensor  # (N, P + C)
    labels: Tensor  # (N, C), -100 past each completion's end
    P: int
    C: int
    pixel_values: Tensor | None = None  # VLM rows: (sum of the rows' patches, D), row i's block after row i-1's
    image_grid_thw: Tensor | None = None  # (N, 3)
    mm_token_type_ids: Tensor | None = None  # (N, P + C), 1 on image tokens

    def __len__(self):
        return self.input_ids.shape[0]

    def rows(self, idx) -> "Packed":
        if self.pixel_values is None:
            return Packed(
                self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx], self.labels[idx], self.P, self.C
            )
        keep = torch.arange(len(self))[idx].tolist()  # pixel blocks regathered by each row's patch count
        blocks = torch.split(self.pixel_values, self.image_grid_thw.prod(-1).tolist())
        pv = torch.cat([blocks[i] for i in keep])
        return Packed(self.input_ids[idx], self.attention_mask[idx], None, self.labels[idx], self.P, self.C,
                      pv, self.image_grid_thw[idx], self.mm_token_type_ids[idx])  # fmt: skip

    def model_inputs(self) -> dict:
        """The forward's inputs: ids, mask and positions (none for VLM rows), plus the images of VLM rows."""
        out = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids)
        if self.pixel_values is not None:
            out.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                       mm_token_type_ids=self.mm_token_type_ids)  # fmt: skip
        return out

    @property
    def valid(self) -> Tensor:  # (N, C) bool
        return self.labels != -100

    @property
    def lengths(self) -> Tensor:  # (N,)
        return self.valid.sum(-1)


def pad_ids(seqs: list[list[int]], device="cpu") -> tuple[Tensor, Tensor]:
    """Right-pad id lists with 0: tokens (n, T) long, T = the longest (at least 1), and lengths (n,) long."""
    T = max(1, max((len(s) for s in seqs), default=1))
    out = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device), torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device, images=None) -> Packed:
    """Left-pad the prompts, right-pad the completions, into one (N, P + C) batch. images: each row's
    vision.Pixels (VLM rows) or None."""
    P = max(len(p) for p in prompts)
    C = max(1, max(len(c) for c in completions))
    N = len(prompts)
    ids = torch.full((N, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + C), dtype=torch.long)
    labels = torch.full((N, C), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=False)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P + len(c)] = 1
        if c:
            ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            labels[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    if images is not None:
        from .vision import check_image_tokens, stack_images

        check_image_tokens(ids, images)
        mm = stack_images(images, device)
        return Packed(ids.to(device), attn.to(device), None, labels.to(device), P, C, mm["pixel_values"],
                      mm["image_grid_thw"], (ids == images[0].token_id).long().to(device))  # fmt: skip
    return Packed(ids.to(device), attn.to(device), pos.to(device), labels.to(device), P, C)


def forward_logits(model, batch: Packed) -> Tensor:
    """Logits that score each completion token: (N, C, V), aligned with batch.labels."""
    out = model(
        **batch.model_inputs(),
        logits_to_keep=batch.C + 1,  # columns P-1 .. P+C-1; the last one scores nothing
        use_cache=False,
    )
    return out.logits[:, : batch.C]  # (N, C, V)


def forward_hidden(model, batch: Packed) -> Tensor:
    """Final hidden states (after the last norm) that score each completion token: (N, C, H)."""
    out = model(
        **batch.model_inputs(),
        logits_to_keep=1,  # the LM head runs on one column only: the loss applies it, fused
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1][:, batch.P - 1 : batch.P + batch.C - 1]  # (N, C, H)


@torch.no_grad()
def sequence_logprobs(model, batch: Packed, *, temperature=1.0, micro_batch=0, entropy=False):
    """Per-token log-probs (N, C) fp32 (and entropies) of the completions, no gradient."""
    n = len(batch)
    step = micro_batch or n
    lps, ents = [], []
    for s in range(0, n, step):
        mb = batch.rows(slice(s, s + step))
        logits = forward_logits(model, mb)  # (n, C, V)
        out = credit_ops.token_logprobs(logits, mb.labels, temperature=temperature, return_entropy=entropy)
        lp, ent = out if entropy else (out, None)
        lps.append(lp.float())
        if entropy:
            ents.append(ent.float())
    return (torch.cat(lps), torch.cat(ents)) if entropy else torch.cat(lps)


@dataclass
class Samples:
    prompts: list[list[int]]  # N prompt id lists (the group's prompt, repeated G times)
    completions: list[list[int]]  # N completion id lists (EOS included when generated)
    texts: list[str]  # N decoded completions (no specials)
    group_ids: Tensor  # (N,) long: the prompt each sample answers
    n_generated: int  # generated tokens, for matched-compute budgets
    images: list | None = None  # N vision.Pixels (the group's image, repeated G times) for VLM rows


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    device="cpu",
    images=None,
):
    """Sample n completions per prompt (batched, left-padded, stop at EOS). Returns completion id lists
    (trimmed after EOS, EOS kept) and their texts; prompt i's samples are rows i*n .. i*n + n - 1.
    images: one vision.Pixels per prompt (a VLM; the vision special tokens are never sampled) or None."""
    P = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompt_ids], device=device)  # (B, P)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=n)
    if images is not None:
        from .vision import generate_kwargs

        kw.update(generate_kwargs(tokenizer, ids, images))
    out = model.generate(input_ids=ids, attention_mask=attn, **kw)  # (B * n, P + L)
    completions = []
    for row in out[:, P:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        else:
            while row and row[-1] == pad:
                row.pop()
        completions.append(row)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return completions, texts


def sampling(r) -> dict:
    """The rollout's sampling settings (cfg.rollout) as `generate` keywords: the rollout and the sampled
    evaluation draw from the same distribution."""
    return dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)


def rollout(model, tokenizer, problems, cfg, device) -> Samples:
    """G samples for each of the B problems from the current (sampling) policy."""
    r = cfg.rollout
    prompts, images = prompt_inputs(tokenizer, problems)  # images: None for text problems
    completions, texts = generate(
        model, tokenizer, prompts, n=r.group_size, device=device, images=images, **sampling(r)
    )
    G = r.group_size
    return Samples(
        prompts=[prompts[i // G] for i in range(len(completions))],
        completions=completions,
        texts=texts,
        group_ids=torch.arange(len(problems)).repeat_interleave(G),
        n_generated=sum(len(c) for c in completions),
        images=None if images is None else [images[i // G] for i in range(len(completions))],
    )
