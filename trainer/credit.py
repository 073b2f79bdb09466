"""The one call site of credit assignment: credit_ops.credit_assign (docs/method.md §1.4-1.6), plus the token-credit
view of a sample group that the report draws.

Rows of the result: the N samples first, then the R repairs that join the loss (train_on_repair), in the
order of `repair_rows` (indices into the reviser's repair list).

Truncation to the first K edit regions: credit.truncate_k (one K for the run) and IOP's verified K (Repair.k,
set by revise.verified_truncation: the K whose grafted prefix the policy completed into a verified answer) reach
credit_assign together as one k per sample, the smaller of the two.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

import credit_ops

from .config import credit_algorithm
from .rewards import CORRECT, is_correct
from .rollout import Samples, pad_ids
from .vision import image_view


@dataclass
class Credit:
    advantages: Tensor  # (N + R, T) fp32
    gates: Tensor | None  # (N + R, T) or None (no gating)
    repair_rows: list[int]  # R indices into the repair list, in row order
    edit_masks: Tensor | None = None  # (N, T) the edit mask of each sample (0 where none), for the report
    metrics: dict = field(default_factory=dict)


ALL_REGIONS = 1 << 30  # a per-sample k that keeps every region


def delimiter_ids(tokenizer, delimiter: str) -> list[int]:
    return tokenizer(delimiter, add_special_tokens=False)["input_ids"]


def assign(
    cfg, samples: Samples, rewards: list[float], repairs, device, delimiter_ids: list[int] | None = None
) -> Credit:
    """Advantages and gates for one step's samples and the repairs that join the loss.

    credit_ops.credit_assign sees completions only (no prompt columns): column j of every output is
    completion token j, the layout of rollout.Packed.labels.
    """
    tokens, lengths = pad_ids(samples.completions, device)  # (N, C), (N,)
    kw = dict(
        algorithm=credit_algorithm(cfg.algo),
        granularity=cfg.credit.granularity,
        delimiter_ids=delimiter_ids if cfg.credit.granularity == "step" else None,
        rho=cfg.credit.rho,
        lam=cfg.credit.lam,
        sign_guard=cfg.credit.sign_guard,
        train_on_repair=cfg.credit.train_on_repair,
        correct_in_loss=None if cfg.algo == "iop" else cfg.credit.correct_in_loss,  # None: IOP's own (off)
        max_edit_ratio=cfg.credit.max_edit_ratio,
        insert_anchor=cfg.credit.insert_anchor,
        adv_mode=cfg.credit.adv_mode or None,
        threshold=CORRECT,  # wrong samples: the verifier's threshold, as for the repairs
    )
    rep = {}
    if repairs:
        r_tokens, r_lengths = pad_ids([r.ids for r in repairs], device)  # (M, Tr), (M,)
        rep = dict(
            repair_tokens=r_tokens,
            repair_lengths=r_lengths,
            repair_of=torch.tensor([r.sample for r in repairs], device=device),
            repair_correct=torch.tensor([is_correct(r.reward) for r in repairs], device=device),
        )
    args = (tokens, lengths, samples.group_ids.to(device), torch.tensor(rewards, dtype=torch.float32, device=device))
    run_k = cfg.credit.truncate_k or None
    # the verified K of each sample's verified repairs (only a verified repair can be chosen)
    verified = {}
    for r in repairs:
        if is_correct(r.reward):
            verified.setdefault(r.sample, set()).add(r.k)
    k, k_of = run_k, {}
    if any(ks != {None} for ks in verified.values()):
        if any(len(ks) > 1 for ks in verified.values()):
            # repairs of one sample with different K: the one credit_assign chooses (the closest accepted one,
            # whatever k is) decides, so find the choice first
            chosen = credit_ops.credit_assign(*args, **rep, **kw).repair_index.tolist()
            k_of = {i: repairs[j].k for i, j in enumerate(chosen) if j >= 0}
        else:
            k_of = {i: next(iter(ks)) for i, ks in verified.items()}
        cap = run_k or ALL_REGIONS
        per_sample = [min(cap, ALL_REGIONS if k_of.get(i) is None else k_of[i]) for i in range(len(rewards))]
        k = torch.tensor(per_sample, dtype=torch.long, device=device)  # (N,)
    out = credit_ops.credit_assign(*args, **rep, **kw, k=k)
    has_repair = out.has_repair.tolist()
    n_truncated = sum(has_repair[i] for i, v in k_of.items() if v is not None)
    adv, gates = out.advantages, out.gates  # (N, C) each
    rows = []
    if out.repair_selected is not None:
        rows = out.repair_selected.nonzero().flatten().tolist()
        if rows:
            width = max(adv.shape[1], out.repair_advantages.shape[1])
            adv = torch.cat([_widen(adv, width), _widen(out.repair_advantages[rows], width)])
            gates = torch.cat([_widen(gates, width), _widen(out.repair_gates[rows], width)])
    m = out.metrics
    metrics = {
        "repair_success": float(m["repair_success_rate"]),
        "repair_verified": float(m["repair_verified_rate"]),
        "rejected_repairs": float(m["rejected_repairs"]),
        "edit_distance": float(m["mean_edit_distance"]),
        "active_tokens": float(m["active_token_ratio"]),
        "phi": float(m["phi_mean"]),
        "repair_rows": float(len(rows)),
        # samples whose repair is credited on its verified first K regions only (IOP's verified truncation)
        "truncated_repairs": float(n_truncated),
    }
    return Credit(adv.float(), gates.float(), rows, out.masks.int(), metrics)


def _widen(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def sample_view(step, tok, samples: Samples, rewards, repairs, credit: Credit, problems) -> dict:
    """One group for the report: the group holding a failed sample with a repair in the loss, if any."""
    N = len(samples.texts)
    by_sample = {repairs[j].sample: (N + r, repairs[j]) for r, j in enumerate(credit.repair_rows)}
    gids = samples.group_ids.tolist()
    g = gids[next(iter(by_sample))] if by_sample else gids[0]
    rows = []
    for i in [i for i in range(N) if gids[i] == g]:
        L = len(samples.completions[i])
        row = {
            "tokens": [tok.decode([t]) for t in samples.completions[i]],
            "advantages": [round(float(a), 4) for a in credit.advantages[i, :L]],
            "reward": rewards[i],
            "mask": [int(x) for x in credit.edit_masks[i, :L]] if credit.edit_masks is not None else None,
        }
        if i in by_sample:
            r, rep = by_sample[i]
            Lr = len(rep.ids)
            row["repair"] = {
                "tokens": [tok.decode([t]) for t in rep.ids],
                "advantages": [round(float(a), 4) for a in credit.advantages[r, :Lr]],
                "reward": rep.reward,
            }
        rows.append(row)
    return {
        "step": step,
        "prompt": problems[gids.index(g)].prompt,
        "answer": problems[gids.index(g)].answer,
        "samples": rows,
        **image_view(problems[gids.index(g)]),  # visual tasks: "image", the group's image as a PNG data URI
    }
