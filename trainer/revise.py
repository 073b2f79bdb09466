"""Revisers: the compare-and-correct operator of docs/method.md §1.3, and IOP's verified truncation.

    oracle    the task's minimal repair (keep the correct prefix of steps, rewrite from the first wrong step)
    policy    the policy itself, in a revision prompt holding the wrong attempt and a sibling reference
    external  a frozen local HF model in the same revision prompt

Every wrong sample i gets one revision per sibling reference (K - 1 of them, correct siblings first, then
wrong ones); the oracle needs no reference and writes one. Each revision is verified with the run's verifier.
"""

from dataclasses import dataclass

import torch

import credit_ops

from .modeling import encode_prompt, load_pretrained
from .rewards import is_correct
from .rollout import generate, pad_ids

REVISION_PROMPT = (
    "{prompt}\nAttempt:\n{attempt}\nReference:\n{reference}\n"
    "The attempt is wrong. Copy its correct steps unchanged and fix it from the first wrong step on.\nRevision:\n"
)


@dataclass
class Repair:
    sample: int  # the sample (row of the rollout) it repairs
    ids: list[int]  # completion ids in the policy's tokenizer, EOS appended
    text: str
    reward: float
    n_generated: int  # tokens a model had to write for it (the oracle: the rewritten suffix)


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


class ModelReviser:
    """Revisions written by a model (the policy, or an external frozen one) in REVISION_PROMPT."""

    def __init__(self, model_fn, tokenizer, policy_tokenizer, verifier, cfg, device):
        self.model_fn, self.tok, self.ptok, self.verify = model_fn, tokenizer, policy_tokenizer, verifier
        self.cfg, self.device = cfg, device

    def __call__(self, problems, samples, rewards) -> list[Repair]:
        gids = samples.group_ids.tolist()
        jobs, prompts = [], []
        for i, p in enumerate(problems):
            if is_correct(rewards[i]):
                continue
            for j in references(rewards, gids, i, self.cfg.revise.n_refs):
                text = REVISION_PROMPT.format(prompt=p.prompt, attempt=samples.texts[i], reference=samples.texts[j])
                jobs.append(i)
                prompts.append(encode_prompt(self.tok, text))
        if not jobs:
            return []
        v = self.cfg.revise
        ids, texts = generate(
            self.model_fn(),
            self.tok,
            prompts,
            n=1,
            max_new_tokens=v.max_new_tokens,
            temperature=v.temperature,
            device=self.device,
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
    model, ext_tok = load_pretrained(cfg.revise.model_path)
    model.to(device).eval().requires_grad_(False)
    return ModelReviser(lambda: model, ext_tok, tokenizer, verifier, cfg, device)


# ---- IOP verified truncation (docs/method.md §2 "Truncation")
@torch.no_grad()
def verified_truncation(model, tokenizer, problems, samples, repairs, verifier, cfg, device):
    """Shorten each verified repair to its first K edit regions when that still verifies (in place).

    For K = k, 2k: graft the repair's tokens up to the end of its K-th edit region, let the policy continue
    from that prefix, and verify; the first continuation that verifies replaces the repair (its diff against
    the failed sample then spans only the early regions). Otherwise the full repair stays (K = all).
    Unverified repairs are left as they are. Returns the tokens generated on the way.
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
            prompt = encode_prompt(tokenizer, p.prompt) + prefix
            cont, _ = generate(
                model,
                tokenizer,
                [prompt],
                n=1,
                max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature,
                device=device,
            )
            spent += len(cont[0])
            ids = prefix + cont[0]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            reward = verifier(p, text)
            if is_correct(reward):
                if ids[-1] != tokenizer.eos_token_id:
                    ids = ids + [tokenizer.eos_token_id]
                r.ids, r.text, r.reward = ids, text, reward
                break
    return spent
