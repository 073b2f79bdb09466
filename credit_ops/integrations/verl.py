"""credit-ops inside verl (tested on verl 0.9.1; needs verl >= 0.7, whose policy losses return a metrics dict).

Three pieces, all selected by name in a verl config once credit-ops is installed:

1. **Policy losses** in verl's registry (``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``), with verl's
   registry signature ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
   rollout_is_weights) -> (loss, metrics)``:

   ===========================  ======================================================================
   ``credit_ops_vanilla``       credit-ops' token loss (PPO clip, dual clip ``clip_ratio_c``): verl's ``vanilla``
   ``credit_ops_gspo``          GSPO-token (``gspo_token``): verl's ``gspo``
   ``credit_ops_gspo_seq``      GSPO with one clipped ratio per sequence (``gspo``)
   ``credit_ops_gated_gspo``    IOP's gated GSPO (``gated_gspo``): the gates enter the sequence ratio
   ===========================  ======================================================================

   Each computes the per-token loss with ``credit_ops.policy_loss_from_logprobs(..., reduction="none")`` and
   aggregates it with verl's own ``agg_loss(..., **config.global_batch_info)``: verl's five ``loss_agg_mode``
   values, its global-batch normalisation over data-parallel ranks and micro-batches, ``loss_scale_factor``, and
   fully masked rows left out of the sequence means, all exactly as verl does. Clip ranges come from
   ``clip_ratio_low`` / ``clip_ratio_high`` (``clip_ratio`` when None), ``rollout_is_weights`` multiply each
   token's loss (credit-ops' ``weights=``), and verl's numerical guards are kept: the token log-ratio clamped to
   [-20, 20] (vanilla), the sequence log-ratio to <= 10 (GSPO family), with no gradient through a clamped value.
   The metrics are verl's ``actor/pg_clipfrac``, ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower``, defined as in
   verl's losses. verl's ``ppo_loss`` adds the entropy and KL terms itself, as for its own losses.

2. **Gates.** verl's ``ppo_loss`` hands a policy loss only ``response_mask, old_log_probs, advantages`` (and
   ``rollout_is_weights``), so the gates reach it in one of two ways:

   - *in the advantages* (the default): ``credit_assign``'s advantages already carry the gates (A_t = g_t A_i), which
     is exact for the token-level and GSPO-token losses, since -min(r g A, clip(r) g A) = g (-min(r A, clip(r) A))
     for g >= 0. ``credit_ops_gated_gspo`` takes the gates as g_t = 1[A_t != 0] on valid tokens: exact for binary
     gates (all that ``credit_assign`` produces with ``unmasked_weight=0``, its default and IOP's), because a row
     whose advantage is 0 everywhere contributes neither loss nor gradient whatever its gates. Without credit
     advantages (e.g. verl's own ``grpo`` estimator) every valid token is gated: plain GSPO with one ratio per
     sequence.
   - *explicitly* (``credit_ops.explicit_gates=true`` with the trainer hook): the hook stores the gates in the
     batch under ``credit_gates`` and installs :func:`credit_ppo_loss` as the actor's loss function; it runs verl's
     own ``ppo_loss`` with those gates visible to the credit-ops losses (needed for fractional gates,
     ``unmasked_weight > 0``).

3. **The trainer hook**, :class:`CreditAdvantageMixin`, for verl's v1 trainers: after verl's advantage step it
   runs ``credit_assign`` on the batch's response tokens, its uid groups, its scores and the repairs, and overwrites
   the advantages. Registering credit-ops with verl also registers ``credit_ops_<mode>`` for every v1 trainer
   mode (``trainer.v1.trainer_mode=credit_ops_sync``). Repairs come from the rollout side as per-sample extra
   fields (``credit_repairs``: a list of repair response-token lists, ``credit_repairs_correct``: their
   verification), written by an agent loop (``AgentLoopOutput.extra_fields``) or a reward function (its
   ``reward_extra_info``), or from an override of :meth:`CreditAdvantageMixin.credit_repairs` on the driver.
   :func:`credit_advantages` is the tensor core the hook calls.

Installing credit-ops registers all of it through verl's ``verl.plugins`` entry point (``import verl`` loads it in
every process): the entry point names :mod:`credit_ops.integrations.verl_plugin`, which calls :func:`register`.
This module imports verl only inside its functions: without verl it imports and its tensor core works.
"""

from __future__ import annotations

import contextvars
import importlib.abc
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

import credit_ops
from credit_ops.ops.credit_assign import CreditAssignment
from credit_ops.reference import ALGORITHMS

logger = logging.getLogger(__name__)

VERL_TESTED = "0.9.1"
VERL_MIN = "0.7"

#: registered name -> credit-ops loss type
LOSS_MODES = {
    "credit_ops_vanilla": "dapo",
    "credit_ops_gspo": "gspo_token",
    "credit_ops_gspo_seq": "gspo",
    "credit_ops_gated_gspo": "gated_gspo",
}
GATES_KEY = "credit_gates"  # the batch field of the explicit gates
REPAIRS_KEY = "credit_repairs"  # per-sample extra field: list of repair response-token lists
REPAIRS_CORRECT_KEY = "credit_repairs_correct"  # per-sample extra field: list of bools, one per repair
TOKEN_LOG_RATIO_CLAMP = 20.0  # verl vanilla: log-ratio clamped to [-20, 20]
SEQ_LOG_RATIO_CLAMP = 10.0  # verl gspo: log-ratio clamped to <= 10

# The explicit gates of the micro-batch being scored (set by credit_ppo_loss around verl's ppo_loss).
_GATES: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("credit_ops_verl_gates", default=None)


# ---- policy losses
def _config_get(config, name, default=None):
    getter = getattr(config, "get", None)
    value = getter(name, default) if callable(getter) else getattr(config, name, default)
    return default if value is None else value


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """verl's masked mean: sum over the mask / (count + 1e-8)."""
    return torch.where(mask, values, 0.0).sum() / (mask.sum() + 1e-8)


def _seq_log_ratio(log_ratio: Tensor, weight: Tensor) -> Tensor:
    """(B, 1) weighted mean of the log-ratio per row (0 for a row without weight), as credit-ops computes it."""
    total = weight.sum(1, keepdim=True)
    mean = (weight * log_ratio).sum(1, keepdim=True) / torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, mean, 0.0)


def _policy_loss(
    loss_type: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
    config,
    rollout_is_weights: Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    from verl.trainer.ppo.core_algos import agg_loss

    if config is None:
        raise ValueError(f"the credit-ops verl losses need the actor config (loss_type {loss_type!r})")
    clip_ratio = _config_get(config, "clip_ratio", 0.2)
    low = float(_config_get(config, "clip_ratio_low", clip_ratio))
    high = float(_config_get(config, "clip_ratio_high", clip_ratio))
    dual_clip = None
    if loss_type == "dapo":
        dual_clip = float(_config_get(config, "clip_ratio_c", 3.0))
        if not dual_clip > 1.0:
            raise ValueError(f"clip_ratio_c (the dual-clip bound) must be > 1, got {dual_clip}")
    mask = response_mask.bool()

    gates = _GATES.get()
    if gates is not None:
        if tuple(gates.shape) != tuple(mask.shape):
            raise ValueError(f"explicit gates {tuple(gates.shape)} do not match the response mask {tuple(mask.shape)}")
        gates = torch.where(mask, gates.to(device=mask.device, dtype=torch.float32), 0.0)
    elif loss_type == "gated_gspo":
        gates = ((advantages != 0) & mask).float()  # gates-in-advantages convention (module docstring)

    # verl's guards: the clamped log-ratio keeps its value and loses its gradient.
    with torch.no_grad():
        log_ratio = torch.where(mask, log_prob - old_log_prob, 0.0)
        if loss_type == "dapo":
            clamped = log_ratio.clamp(-TOKEN_LOG_RATIO_CLAMP, TOKEN_LOG_RATIO_CLAMP)
            frozen = mask & (log_ratio != clamped)
            old_used = torch.where(frozen, log_prob - clamped, old_log_prob)
            ratio = clamped.exp()
            ppo_kl = _masked_mean(-clamped, mask)
        else:
            weight = mask.float() if loss_type != "gated_gspo" else gates
            seq = _seq_log_ratio(log_ratio, weight)
            frozen = mask & (seq > SEQ_LOG_RATIO_CLAMP)
            old_used = torch.where(frozen, old_log_prob + (seq - SEQ_LOG_RATIO_CLAMP), old_log_prob)
            ratio = seq.clamp(max=SEQ_LOG_RATIO_CLAMP).exp().expand_as(log_ratio)
            ppo_kl = _masked_mean(-log_ratio, mask)
    logp_used = torch.where(frozen, log_prob.detach(), log_prob)
    weights = None if rollout_is_weights is None else torch.where(mask, rollout_is_weights, 0.0)

    per_token, _ = credit_ops.policy_loss_from_logprobs(
        logp_used,
        advantages,
        old_logprobs=old_used.detach(),
        mask=mask,
        gates=gates,
        weights=weights,
        loss_type=loss_type,
        eps_low=low,
        eps_high=high,
        dual_clip=dual_clip,
        reduction="none",
    )
    global_batch_info = _config_get(config, "global_batch_info", {}) or {}
    loss = agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **global_batch_info)

    with torch.no_grad():
        adv = advantages.detach()
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
        values = [_masked_mean((clipped > unclipped).float(), mask), ppo_kl]
        if dual_clip is not None:
            lower = (torch.maximum(unclipped, clipped) > -adv * dual_clip) & (adv < 0)
            values.append(_masked_mean(lower.float(), mask))
        else:
            values.append(torch.zeros((), device=ppo_kl.device))
        if loss_type == "gated_gspo":
            values.append(_masked_mean((gates > 0).float(), mask))
        values = torch.stack([v.float() for v in values]).tolist()  # one host sync
    metrics = {"actor/pg_clipfrac": values[0], "actor/ppo_kl": values[1], "actor/pg_clipfrac_lower": values[2]}
    if loss_type == "gated_gspo":
        metrics["actor/credit_gated_frac"] = values[3]
    return loss, metrics


def _registered(name: str, loss_type: str, default_agg: str, doc: str) -> Callable:
    """A policy loss with verl's registry signature that runs credit-ops' ``loss_type``."""

    def loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = default_agg,
        config=None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        return _policy_loss(
            loss_type, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
        )

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = doc
    return loss


credit_ops_vanilla = _registered(
    "credit_ops_vanilla",
    "dapo",
    "token-mean",
    """verl's ``vanilla`` PPO loss (dual clip at ``clip_ratio_c``) computed by credit-ops, with per-token
    advantages and, through :func:`credit_ppo_loss`, explicit gates.""",
)
credit_ops_gspo = _registered(
    "credit_ops_gspo",
    "gspo_token",
    "seq-mean-token-mean",
    """verl's ``gspo`` loss (GSPO-token: the sequence ratio's value, each token's own gradient) computed by
    credit-ops.""",
)
credit_ops_gspo_seq = _registered(
    "credit_ops_gspo_seq",
    "gspo",
    "seq-mean-token-mean",
    """GSPO with one ratio per sequence, clipped per sequence (credit-ops' ``gspo``); equals ``credit_ops_gspo``
    for advantages constant along each row without rollout weights.""",
)
credit_ops_gated_gspo = _registered(
    "credit_ops_gated_gspo",
    "gated_gspo",
    "seq-mean-token-mean",
    """IOP's gated GSPO: s_b = exp(sum_t g_t l_t / sum_t g_t) over the gated tokens, each token's loss times its
    gate. The gates are the explicit ones of :func:`credit_ppo_loss`, else 1[advantage != 0] (module docstring).""",
)

POLICY_LOSSES: dict[str, Callable] = {
    f.__name__: f for f in (credit_ops_vanilla, credit_ops_gspo, credit_ops_gspo_seq, credit_ops_gated_gspo)
}


def credit_ppo_loss(config, model_output, data, dp_group=None):
    """verl's whole-loss function (``verl.workers.utils.losses.ppo_loss``, same signature and result) with the
    batch's ``credit_gates`` visible to the credit-ops policy losses. Installed by :class:`CreditAdvantageMixin`
    with ``credit_ops.explicit_gates=true``; without the field it is verl's ``ppo_loss`` unchanged."""
    from verl.workers.utils.losses import ppo_loss

    gates = None
    if GATES_KEY in data.keys():
        gates = data.select("response_mask", GATES_KEY).to_padded_tensor()[GATES_KEY]
    token = _GATES.set(gates)
    try:
        return ppo_loss(config, model_output, data, dp_group)
    finally:
        _GATES.reset(token)


# ---- the advantage step
class VerlCredit(NamedTuple):
    """What the trainer hook writes for a batch of N responses (T columns).

    Shapes: advantages (N, T) float32 (0 outside response_mask); gates (N, T) float32; metrics: ``credit/<name>``
    -> float; assignment: the full :class:`credit_ops.CreditAssignment`.
    """

    advantages: Tensor
    gates: Tensor
    metrics: dict[str, float]
    assignment: CreditAssignment


def group_ids_from_uid(uid: Sequence) -> Tensor:
    """Dense int64 group ids (0, 1, ... in order of first appearance) for verl's per-sample ``uid`` values."""
    ids: dict = {}
    return torch.tensor([ids.setdefault(u, len(ids)) for u in uid], dtype=torch.int64)


def credit_advantages(
    responses: Tensor,
    response_mask: Tensor,
    uid: Sequence,
    scores: Tensor,
    repairs: Sequence[Sequence] | None = None,
    repairs_correct: Sequence[Sequence[bool]] | None = None,
    *,
    response_lengths: Tensor | None = None,
    algorithm: str = "ibpo",
    norm_adv_by_std: bool = True,
    **credit_kwargs,
) -> VerlCredit:
    """``credit_assign`` on a verl batch: per-token advantages and gates for N responses.

    ``responses`` (N, T) are the response token ids, right-padded (verl's ``responses``); ``response_mask`` (N, T)
    verl's loss mask (0 on padding and on tool tokens of multi-turn responses); ``uid`` the N group keys (verl's
    ``uid``: the samples of one prompt share it); ``scores`` (N,) or token-level (N, T) rewards (summed over the
    row, as verl's outcome estimators do); ``repairs[i]`` the repairs of sample i (response-token sequences: lists
    or 1-D tensors, without the prompt, which they share with sample i) and ``repairs_correct[i]`` their
    verification results. ``response_lengths`` (N,) default to the position after each row's last masked-in
    token. ``norm_adv_by_std=False`` (verl's ``norm_adv_by_std_in_grpo``) normalises by the group mean only
    (``adv_mode="dr_grpo"``) for algorithms whose mode is ``grpo``. Other keywords go to ``credit_assign``
    (``rho``, ``lam``, ``threshold``, ``sign_guard``, ``max_edit_ratio``, ``granularity``, ``delimiter_ids``,
    ``k``, ``unmasked_weight``, ``eps``, ...); repair rows cannot join a verl batch, so ``train_on_repair`` is off.

    verl's ``grpo`` estimator gives a group of one advantage R (mean 0, std 1); credit-ops gives it 0.
    """
    if credit_kwargs.get("train_on_repair"):
        raise ValueError("train_on_repair is not supported inside verl: repair rows cannot join the batch")
    credit_kwargs["train_on_repair"] = False
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    if not norm_adv_by_std and credit_kwargs.get("adv_mode") is None and ALGORITHMS[algorithm]["mode"] == "grpo":
        credit_kwargs["adv_mode"] = "dr_grpo"
    if responses.dim() != 2 or tuple(response_mask.shape) != tuple(responses.shape):
        raise ValueError(
            f"responses {tuple(responses.shape)} and response_mask {tuple(response_mask.shape)} must be the same (N, T)"
        )
    N, T = responses.shape
    device = responses.device
    mask = response_mask.bool()
    if len(uid) != N:
        raise ValueError(f"uid has {len(uid)} entries for {N} responses")
    if response_lengths is None:
        positions = torch.arange(1, T + 1, device=device)
        response_lengths = (mask * positions).amax(1) if T else torch.zeros(N, dtype=torch.int64, device=device)
    scores = scores.sum(-1) if scores.dim() == 2 else scores
    rep = {}
    if repairs is not None:
        if repairs_correct is None or len(repairs) != N or len(repairs_correct) != N:
            raise ValueError("repairs and repairs_correct must both hold one list per response")
        rows = []
        for i, (seqs, oks) in enumerate(zip(repairs, repairs_correct, strict=True)):
            seqs, oks = list(seqs or []), list(oks or [])
            if len(seqs) != len(oks):
                raise ValueError(f"sample {i}: {len(seqs)} repairs but {len(oks)} verification results")
            for seq, ok in zip(seqs, oks, strict=True):
                rows.append((i, torch.as_tensor(seq, dtype=torch.int64).flatten(), bool(ok)))
        if rows:
            width = max(1, max(len(s) for _, s, _ in rows))
            repair_tokens = torch.zeros(len(rows), width, dtype=responses.dtype, device=device)
            for j, (_, s, _) in enumerate(rows):
                repair_tokens[j, : len(s)] = s.to(device=device, dtype=responses.dtype)
            rep = dict(
                repair_tokens=repair_tokens,
                repair_lengths=torch.tensor([len(s) for _, s, _ in rows], dtype=torch.int64, device=device),
                repair_of=torch.tensor([i for i, _, _ in rows], dtype=torch.int64, device=device),
                repair_correct=torch.tensor([ok for _, _, ok in rows], dtype=torch.bool, device=device),
            )
    out = credit_ops.credit_assign(
        responses,
        response_lengths.to(device=device, dtype=torch.int64),
        group_ids_from_uid(uid).to(device),
        scores.to(device=device, dtype=torch.float32),
        **rep,
        algorithm=algorithm,
        **credit_kwargs,
    )
    advantages = torch.where(mask, out.advantages.float(), 0.0)
    gates = torch.where(mask, out.gates.float(), 0.0)
    names = list(out.metrics)
    values = torch.stack([out.metrics[k].float() for k in names]).tolist() if names else []
    return VerlCredit(advantages, gates, {f"credit/{k}": v for k, v in zip(names, values, strict=True)}, out)


class CreditSettings(NamedTuple):
    """The ``credit_ops`` section of a verl config (all optional)."""

    algorithm: str
    explicit_gates: bool
    credit_kwargs: dict


_HOOK_KEYS = {"algorithm", "explicit_gates"}


def credit_settings(config) -> CreditSettings:
    """Read the top-level ``credit_ops`` section of a verl trainer config (a DictConfig or a dict): ``algorithm``
    (default ``ibpo``), ``explicit_gates`` (default false) and any ``credit_assign`` keyword (``rho``, ``lam``,
    ``threshold``, ``max_edit_ratio``, ``granularity``, ``delimiter_ids``, ``k``, ``unmasked_weight``, ``eps``, ...).
    Raises on an unknown key or a combination the verl integration cannot reproduce."""
    section = _config_get(config, "credit_ops", None) or {}
    try:  # OmegaConf -> plain containers
        from omegaconf import OmegaConf

        if OmegaConf.is_config(section):
            section = OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover - verl always brings omegaconf
        pass
    section = dict(section)
    kwargs = {k: v for k, v in section.items() if k not in _HOOK_KEYS}
    allowed = set(inspect.signature(credit_ops.credit_assign).parameters) - {
        "tokens",
        "lengths",
        "group_ids",
        "rewards",
        "repair_tokens",
        "repair_lengths",
        "repair_of",
        "repair_correct",
        "algorithm",
        "prompt_lengths",
        "num_groups",
    }
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown credit_ops settings {unknown}; allowed: {sorted(allowed | _HOOK_KEYS)}")
    algorithm = section.get("algorithm", "ibpo")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"credit_ops.algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    explicit = bool(section.get("explicit_gates", False))
    loss_mode = None
    try:
        loss_mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode")
    except AttributeError:
        pass
    if loss_mode == "credit_ops_gated_gspo" and float(kwargs.get("unmasked_weight", 0.0)) > 0 and not explicit:
        raise ValueError(
            "credit_ops_gated_gspo with unmasked_weight > 0 (fractional gates) needs credit_ops.explicit_gates=true"
        )
    return CreditSettings(algorithm, explicit, kwargs)


def _transfer_queue():
    import transfer_queue

    return transfer_queue


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class CreditAdvantageMixin:
    """credit-ops' advantage step for a verl v1 trainer: ``class T(CreditAdvantageMixin, PPOTrainerSync)``, or the
    registered modes ``trainer.v1.trainer_mode=credit_ops_<mode>`` (``credit_ops_sync``, ...).

    ``_compute_advantage`` first runs verl's own step (KL in reward, rollout correction, verl's estimator: use
    ``algorithm.adv_estimator=grpo``), then reads the batch's ``uid``, ``responses``, ``response_mask`` and
    ``rm_scores`` from the TransferQueue, takes the repairs from :meth:`credit_repairs`, runs
    :func:`credit_advantages` on the real rows (verl's padding rows get 0) and writes the advantages back (and
    ``credit_gates`` with ``credit_ops.explicit_gates``). verl's returns are left alone. Settings: the top-level
    ``credit_ops`` config section (:func:`credit_settings`). Not supported: agent loops with several outputs per
    session, and the credit of KL-in-reward (``algorithm.use_kl_in_reward``; the scores are ``rm_scores``).
    """

    def init(self):
        settings = credit_settings(self.config)
        if self.config.algorithm.get("use_kl_in_reward", False):
            raise ValueError("credit_ops: algorithm.use_kl_in_reward is not supported (the credit uses rm_scores)")
        super().init()
        if settings.explicit_gates:
            from functools import partial

            from verl.trainer.distillation import is_distillation_enabled
            from verl.utils.config import omega_conf_to_dataclass

            if is_distillation_enabled(self.config.get("distillation")):
                raise ValueError("credit_ops.explicit_gates does not support distillation losses")
            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(partial(credit_ppo_loss, config=actor_config))

    def credit_repairs(self, data, rows: list[int]) -> tuple[list | None, list | None]:
        """(repairs, repairs_correct) for the batch rows ``rows`` (indices into ``data``, the TransferQueue fields of
        the batch): one list of repair response-token sequences and one list of bools per row, or (None, None).
        Default: each sample's ``extra_fields["credit_repairs"]`` / ``["credit_repairs_correct"]``, or the same keys
        in ``extra_fields["reward_extra_info"]`` (a reward function's extra outputs); a repair is a list of token ids
        or a string (tokenized with the trainer's tokenizer). Override it to revise on the driver (e.g. with the
        siblings of each wrong sample as references)."""
        if "extra_fields" not in data.keys():
            return None, None
        extras = _as_list(data["extra_fields"])
        repairs, correct, found = [], [], False
        for i in rows:
            extra = extras[i] if isinstance(extras[i], dict) else {}
            source = extra if REPAIRS_KEY in extra else (extra.get("reward_extra_info") or {})
            seqs = source.get(REPAIRS_KEY)
            found |= seqs is not None
            seqs = [] if seqs is None else _as_list(seqs)
            oks = source.get(REPAIRS_CORRECT_KEY)
            if oks is None and seqs:
                raise ValueError(f"credit_ops: sample {i} has {REPAIRS_KEY} but no {REPAIRS_CORRECT_KEY}")
            oks = [] if oks is None else _as_list(oks)
            repairs.append([self._credit_tokens(s) for s in seqs])
            correct.append([bool(ok) for ok in oks])
        return (repairs, correct) if found else (None, None)

    def _credit_tokens(self, repair) -> list[int]:
        """A repair as response token ids: ids as given, a string through the trainer's tokenizer (without special
        tokens; exact only where it tokenizes the unchanged text as the policy did)."""
        if isinstance(repair, str):
            return list(self.tokenizer.encode(repair, add_special_tokens=False))
        return [int(t) for t in _as_list(repair)]

    def _compute_advantage(self, batch, metrics: dict):
        batch = super()._compute_advantage(batch, metrics)
        from tensordict import TensorDict
        from verl.workers.utils.padding import response_to_nested

        settings = credit_settings(self.config)
        for key in batch.keys:
            if not str(key).endswith("_0"):
                raise NotImplementedError(f"credit_ops: agent loops with several outputs per session ({key})")
        tq = _transfer_queue()
        fields = ["uid", "responses", "response_mask", "rm_scores"]
        wants_repairs = ALGORITHMS[settings.algorithm]["masks"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        if wants_repairs:
            try:
                extra = tq.kv_batch_get(
                    keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"]
                )
                data["extra_fields"] = extra["extra_fields"]
            except Exception as e:  # no sample carries extra fields
                logger.debug("credit_ops: no extra_fields in the batch (%s)", e)
        nested_mask = data["response_mask"]
        lengths = nested_mask.offsets().diff()
        padded = data.select("responses", "response_mask", "rm_scores").to_padded_tensor()
        responses, mask, scores = padded["responses"], padded["response_mask"], padded["rm_scores"].sum(-1)
        uid = _as_list(data["uid"])
        rows = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
        repairs, correct = self.credit_repairs(data, rows) if wants_repairs else (None, None)
        index = torch.tensor(rows, dtype=torch.int64)
        credit = credit_advantages(
            responses[index],
            mask[index],
            [uid[i] for i in rows],
            scores[index],
            repairs,
            correct,
            response_lengths=lengths[index],
            algorithm=settings.algorithm,
            norm_adv_by_std=bool(self.config.algorithm.get("norm_adv_by_std_in_grpo", True)),
            **settings.credit_kwargs,
        )
        advantages = torch.zeros(mask.shape, dtype=torch.float32)
        advantages[index] = credit.advantages
        output = {"advantages": response_to_nested(advantages, nested_mask)}
        if settings.explicit_gates:
            gates = torch.zeros(mask.shape, dtype=torch.float32)
            gates[index] = credit.gates
            output[GATES_KEY] = response_to_nested(gates, nested_mask)
        batch = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )
        metrics.update(credit.metrics)
        return batch


# ---- registration
def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def register_trainers(registry_module=None) -> list[str]:
    """Register ``credit_ops_<mode>`` (:class:`CreditAdvantageMixin` over the trainer) for every v1 trainer mode
    verl has registered (``sync``, ``colocate_async``, ``separate_async`` in 0.9.1). Idempotent."""
    if registry_module is None:
        from verl.trainer.ppo.v1 import trainer_base as registry_module
    registry = registry_module.TRAINER_REGISTRY
    names = []
    for mode, cls in list(registry.items()):
        if mode.startswith("credit_ops_") or issubclass(cls, CreditAdvantageMixin):
            continue
        name = f"credit_ops_{mode}"
        if name not in registry:
            credit_cls = type(f"Credit{cls.__name__}", (CreditAdvantageMixin, cls), {"__module__": __name__})
            registry_module.register_trainer(name)(credit_cls)
        names.append(name)
    return names


class _CallbackLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then a callback with the fresh module."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._callback(module)
        except Exception as e:  # never break verl's own import
            logger.warning("credit_ops: post-import hook for %s failed: %s", module.__name__, e)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot meta-path finder: when module ``name`` is imported, run ``callback(module)`` after it executes."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self.done = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if self.done or fullname != self.name:
            return None
        self.done = True
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        spec.loader = _CallbackLoader(spec.loader, self._run)
        return spec

    def _run(self, module):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback(module)


def after_import(name: str, callback) -> None:
    """Run ``callback(module)`` once module ``name`` is imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    sys.meta_path.insert(0, _AfterImport(name, callback))


_TRAINER_HOOK_INSTALLED = False


def register() -> list[str]:
    """Put the credit-ops policy losses into verl's registry, and register the ``credit_ops_<mode>`` trainers as
    soon as verl's v1 trainers are imported. Idempotent; needs verl >= 0.7. Returns the policy-loss names."""
    global _TRAINER_HOOK_INSTALLED
    import verl
    from verl.trainer.ppo import core_algos

    version = getattr(verl, "__version__", "0")
    if _version_tuple(version) < _version_tuple(VERL_MIN):
        raise ImportError(
            f"credit_ops.integrations.verl needs verl >= {VERL_MIN} (tested on {VERL_TESTED}), found {version}"
        )
    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(fn)
    if not _TRAINER_HOOK_INSTALLED:
        _TRAINER_HOOK_INSTALLED = True
        after_import("verl.trainer.ppo.v1", lambda _: register_trainers())
    return list(POLICY_LOSSES)


__all__ = [
    "GATES_KEY",
    "LOSS_MODES",
    "POLICY_LOSSES",
    "REPAIRS_CORRECT_KEY",
    "REPAIRS_KEY",
    "CreditAdvantageMixin",
    "CreditSettings",
    "VerlCredit",
    "after_import",
    "credit_advantages",
    "credit_ops_gated_gspo",
    "credit_ops_gspo",
    "credit_ops_gspo_seq",
    "credit_ops_vanilla",
    "credit_ppo_loss",
    "credit_settings",
    "group_ids_from_uid",
    "register",
    "register_trainers",
]
