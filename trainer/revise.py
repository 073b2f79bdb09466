"""Revisers: the compare-and-correct operator of docs/method.md §1.3, and IOP's verified truncation.

    oracle    the task's minimal repair (keep the correct prefix of steps, rewrite from the first wrong step)
    policy    the policy itself, in a revision prompt holding the wrong attempt and a sibling reference
    external  a frozen local HF model in the same revision prompt

Every wrong sample i gets one revision per sibling reference (K - 1 = revise.n_refs of them, correct siblings
first, then wrong ones; K = 1: one revision without a reference); the oracle needs no reference and writes one.
Each revision is verified with the run's verifier.

The embedded model learns the revision mode in its warm start (`revision_examples`: a wrong attempt, a sibling
reference or none, and the minimal repair as the target), as IOP cold-starts its repair mode with supervised
error -> repair pairs; a pretrained instruct model is prompted in the same format.
"""

from dataclasses import dataclass

import torch

import credit_ops

from .modeling import load_pretrained
from .rewards import is_correct
from .rollout import generate, pad_ids
from .vision import is_vlm_dir, load_vlm, prompt_inputs

# Short on purpose: the embedded model reads it character by character (its context holds the prompt, the
# attempt, one reference and the revision).
REVISION_PROMPT = "{prompt}\nWrong attempt: {attempt}\n{reference}Fix it from its first wrong step:\n"
REFERENCE_LINE = "Reference: {reference}\n"


def revision_prompt(prompt: str, attempt: str, reference: str | None) -> str:
    """The revision prompt for one (wrong attempt, reference) pair; reference None: the attempt alone (K = 1)."""
    ref = "" if reference is None else REFERENCE_LINE.format(reference=reference)
    return REVISION_PROMPT.format(prompt=prompt, attempt=attempt, reference=ref)


def revision_examples(task, n: int, gen: torch.Generator) -> list[tuple[str, str]]:
    """n supervised (revision prompt, minimal repair) pairs for the warm start: a wrong attempt at a problem (the
    task's own noisy demonstrations, drawn until one is wrong), one sibling reference drawn the same way (correct
    or wrong, as siblings are) or, one time in four, none; the target is the task oracle's minimal repair (the
    attempt's correct steps kept, the rest rewritten). Empty when the task cannot make wrong attempts."""
    out = []
    for p in task.sample(n, gen):
        attempt = task.wrong_attempt(p, gen)
        if attempt is None:
            return []
        fixed = task.repair(p, attempt)
        if fixed is None:  # not checkable
            return []
        ref = None if float(torch.rand((), generator=gen)) < 0.25 else task.demonstration(p, gen)
        out.append((revision_prompt(p.prompt, attempt, ref), fixed))
    return out


@dataclass
class Repair:
    sample: int  # the sample (row of the rollout) it repairs
    ids: list[int]  # completion ids in the policy's tokenizer, EOS appended
    text: str
    reward: float
    n_generated: int  # tokens a model had to write for it (the oracle: the rewritten suffix)
    k: int | None = None  # IOP's verified K: only its first k edit regions get credit (None: all)


def references(rewards: list[float], group_ids: list[int], i: int, k: int) -> list[int]:
    """Up to k sibling indices for sample i: correct siblings first (higher reward first), then wrong ones."""
    sib = [j for j, g in enumerate(group_ids) if g == group_ids[i] and j != i]
    sib.sort(key=lambda j: -rewards[j])  # stable: ties keep sampling order
    return sib[:k]


def _encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


class OracleReviser:
    def __init__(self, task, tokenizer, verifier):
        self.task, self.tok, self.verify = task, tokenizer, verifier

    def __call__(self, problems, samples, rewards) -> list[Repair]:
        out = []
        for i, (p, text) in enumerate(zip(problems, samples.texts, strict=False)):
            if is_correct(rewards[i]):
                continue
            fixed = self.task.repair(p, text)
            if fixed is None:
                continue
            ids = _encode_completion(self.tok, fixed)
            old = samples.completions[i]
            keep = 0
            while keep < min(len(ids), len(old)) and ids[keep] == old[keep]:
                keep += 1
            out.append(Repair(i, ids, fixed, self.verify(p, fixed), len(ids) - keep))
        return out


def context_length(model) -> int | None:
    """The model's context in positions (max_position_embeddings; a VLM's text model's), None when unknown."""
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "text_config", None)):
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def revision_positions(cfg, prompt_chars: int) -> int:
    """Positions the embedded (character-level: a token per character) policy needs to revise: <bos>, the revision
    prompt around a problem prompt of prompt_chars characters, a wrong attempt and a reference of up to
    rollout.max_new_tokens characters each, then the revision's revise.max_new_tokens."""
    n = cfg.rollout.max_new_tokens
    return 1 + len(revision_prompt("x" * prompt_chars, "x" * n, "x" * n)) + cfg.revise.max_new_tokens


class ModelReviser:
    """Revisions written by a model (the policy, or an external frozen one) in REVISION_PROMPT. A revision prompt
    and its revise.max_new_tokens must fit the model's context: a longer one is an error (ValueError), not a
    truncated prompt, whose revisions would silently never verify."""

    def __init__(self, model_fn, tokenizer, policy_tokenizer, verifier, cfg, device):
        self.model_fn, self.tok, self.ptok, self.verify = model_fn, tokenizer, policy_tokenizer, verifier
        self.cfg, self.device = cfg, device

    def __call__(self, problems, samples, rewards) -> list[Repair]:
        gids = samples.group_ids.tolist()
        jobs, prompts = [], []
        for i, p in enumerate(problems):
            if is_correct(rewards[i]):
                continue
            refs = references(rewards, gids, i, self.cfg.revise.n_refs) or [None]  # n_refs = 0: the attempt alone
            for j in refs:
                ref = None if j is None else samples.texts[j]
                text = revision_prompt(p.prompt, samples.texts[i], ref)
                jobs.append(i)
                prompts.append(text)
        if not jobs:
            return []
        # VLM: the revision prompt holds the problem's image too (a repair must see what the attempt misread)
        prompts, images = prompt_inputs(self.tok, [problems[i] for i in jobs], texts=prompts)
        v = self.cfg.revise
        model = self.model_fn()
        ctx, longest = context_length(model), max(len(p) for p in prompts)
        if ctx is not None and longest + v.max_new_tokens > ctx:
            raise ValueError(
                f"revise.reviser={v.reviser}: a revision prompt of {longest} tokens plus revise.max_new_tokens="
                f"{v.max_new_tokens} needs {longest + v.max_new_tokens} positions, more than the model's {ctx}; raise "
                "model.max_positions (the embedded model) or shorten rollout.max_new_tokens (the attempt and the "
                "references in the prompt) or revise.max_new_tokens"
            )
        ids, texts = generate(
            model,
            self.tok,
            prompts,
            n=1,
            max_new_tokens=v.max_new_tokens,
            temperature=v.temperature,
            device=self.device,
            images=images,
        )
        out = []
        for i, gen_ids, text in zip(jobs, ids, texts, strict=False):
            text = text.strip()
            out.append(
                Repair(i, _encode_completion(self.ptok, text), text, self.verify(problems[i], text), len(gen_ids))
            )
        return out


def build_reviser(cfg, task, tokenizer, verifier, policy_fn, device):
    """policy_fn() returns the (unwrapped) policy for generation."""
    kind = cfg.revise.reviser
    if kind == "oracle":
        return OracleReviser(task, tokenizer, verifier)
    if kind == "policy":
        return ModelReviser(policy_fn, tokenizer, tokenizer, verifier, cfg, device)
    path = cfg.revise.model_path
    model, ext_tok = load_vlm(path) if is_vlm_dir(path) else load_pretrained(path)
    model.to(device).eval().requires_grad_(False)
    return ModelReviser(lambda: model, ext_tok, tokenizer, verifier, cfg, device)


# ---- IOP verified truncation (docs/method.md §2 "Truncation")
@torch.no_grad()
def verified_truncation(model, tokenizer, problems, samples, repairs, verifier, cfg, device):
    """Find, for each verified repair, the fewest of its first edit regions that suffice, and set its `k` (in place).

    For K = k, 2k: graft the repair's tokens up to the end of its K-th edit region, let the policy continue
    from that prefix, and verify; the first continuation that verifies replaces the repair and sets repair.k = K,
    so credit_assign keeps only the first K edit regions in both masks (credit.assign passes k per sample).
    Setting K is what matters: the continuation of a chain problem recomputes every later step from the fixed
    one, so its diff against the failed sample spans the later regions again (with a policy that continues as
    the oracle does, the continuation is the oracle's repair token for token). Otherwise the full repair stays
    (k = None, all regions). Unverified repairs are left as they are. Returns the tokens generated on the way.
    """
    repairs = [r for r in repairs if is_correct(r.reward)]
    if not repairs:
        return 0
    a_t, a_len = pad_ids([samples.completions[r.sample] for r in repairs], device)
    b_t, b_len = pad_ids([r.ids for r in repairs], device)
    aligned = credit_ops.align_edits(a_t, a_len, b_t, b_len, insert_anchor=cfg.credit.insert_anchor)
    region_b = aligned.region_b.cpu()  # (M, Tb): edit-region index of each repair token, -1 where unedited
    k0, spent = max(1, cfg.revise.truncate_k), 0
    for r, row, n_regions in zip(repairs, region_b, (region_b.max(-1).values + 1).tolist(), strict=False):
        p = problems[r.sample]
        for K in (k0, 2 * k0):
            if K >= n_regions:
                break
            in_first = ((row >= 0) & (row < K)).nonzero()
            if len(in_first) == 0:
                break
            prefix = r.ids[: int(in_first.max()) + 1]
            head, images = prompt_inputs(tokenizer, [p])  # VLM: the problem's image as well
            prompt = head[0] + prefix
            cont, _ = generate(
                model,
                tokenizer,
                [prompt],
                n=1,
                max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature,
                device=device,
                images=images,
            )
            spent += len(cont[0])
            ids = prefix + cont[0]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reward = verifier(p, text)
            if is_correct(reward):
                if ids[-1] != tokenizer.eos_token_id:
                    ids = ids + [tokenizer.eos_token_id]
                r.ids, r.text, r.reward, r.k = ids, text, reward, K
                break
    return spent
