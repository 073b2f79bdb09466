"""credit-ops inside TRL: a ``trl.GRPOTrainer`` whose advantages come from ``credit_ops.credit_assign``.

    CreditGRPOTrainer(model, reward_funcs, args=GRPOConfig(...), ..., credit=CreditConfig(algorithm="ibpo"),
                      reviser=OracleReviser(fix), use_credit_ops_loss=False)

Every generation batch (docs/method.md §1):

1. TRL samples and scores the completions as usual (``_generate_and_score_completions``).
2. The batch is gathered across processes (groups may straddle them). The wrong samples (reward < threshold)
   are revised by the reviser, against up to ``n_refs`` sibling references (correct siblings first); the work is
   split evenly over the processes, so generation stays a collective with equal shares.
3. Each repair is verified with the trainer's own reward functions (weighted sum >= ``repair_threshold``).
4. ``credit_assign`` runs on the whole generation batch; each process keeps its rows. The per-token advantages,
   with the gates already folded in (exact for every TRL loss type: gates are >= 0 and multiply a term linear in
   the advantage), replace TRL's ``(B,)`` advantages; ``train_on_repair`` appends the chosen repairs as extra rows.
5. The loss is TRL's own ``_compute_loss``, or with ``use_credit_ops_loss=True``
   ``credit_ops.fused_linear_policy_loss`` from the backbone's hidden states and the LM head (never the logits).

Credit metrics go through TRL's own logging under ``credit/*``. Tested with TRL 1.16.x only; another version
fails at construction.

Revisers are callables ``reviser(*, prompts, completions, references, trainer, **columns) -> list``: one entry
per wrong sample (its prompt, its completion text, the texts of its sibling references, the dataset columns of
its row), each a repair string, a list of repair strings, or None (no repair). Built-ins: ``PolicyReviser`` (the
policy itself in a revision prompt, through the trainer's own generation backend), ``OracleReviser`` (a task
oracle ``fn(prompt, completion, **row) -> str | None``) and ``ExternalReviser`` (a frozen local model).

Vision-language models (processing_class a ProcessorMixin, the dataset's "image" / "images" column): the prompts a
reviser gets hold the images (TRL's multimodal messages) and the columns include them; a repair row reuses its
sample's images (regathered with TRL's own ``split_pixel_values_by_grid``), so its old / reference log-probs and its
loss are taken with them in context; ``PolicyReviser`` puts the sample's images in its revision prompt and generates
through TRL's image path; ``use_credit_ops_loss=True`` feeds the image inputs to the backbone as TRL's fused head
does. ``ExternalReviser`` is text-only and refused for VLMs. Checked with Qwen2-VL (tests/test_integrations_trl_vlm.py);
other VLM families go through the same TRL helpers, untested.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

import credit_ops
from credit_ops.reference import ADVANTAGE_MODES, ALGORITHMS
from credit_ops.trainer.revise import REFERENCE_LINE, REVISION_PROMPT  # the project trainer's revision prompt

try:
    import trl
    from accelerate.utils import gather_object, is_peft_model
    from packaging.version import Version
    from trl import GRPOTrainer
    from trl.models.utils import _ForwardRedirection, disable_gradient_checkpointing
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid, use_adapter
except ImportError as e:  # pragma: no cover - only without TRL
    raise ImportError(
        "credit_ops.integrations.trl needs TRL 1.16.x: pip install 'trl>=1.16,<1.17' "
        f"(the version this adapter is tested with) ({e})"
    ) from e

__all__ = [
    "SUPPORTED_TRL",
    "CreditConfig",
    "CreditGRPOTrainer",
    "ExternalReviser",
    "OracleReviser",
    "PolicyReviser",
    "Reviser",
]

SUPPORTED_TRL = ("1.16.0", "1.17.0")  # [lowest, first unsupported): the private TRL methods this subclass overrides

# TRL loss types whose normaliser is a token mean (dapo's global one, bnpo's local one): extra, partly empty rows
# leave them exact, which row-counting normalisers (grpo, sapo, dr_grpo, luspo) are not.
TOKEN_MEAN_LOSSES = ("dapo", "bnpo", "cispo", "vespo")
# TRL loss types credit_ops' loss reproduces, with the aggregation that matches TRL's normaliser.
CREDIT_LOSS_AGG = {
    "grpo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
    "dapo": "token_mean",  # rescaled to TRL's global token count
    "luspo": "seq_mean_token_sum",
}
SCALE_REWARDS_MODE = {"group": "grpo", "batch": "grpo_batch_std", "none": "dr_grpo"}
# The multimodal model inputs TRL's _generate_and_score_completions returns and _compute_loss feeds the model
# (pixel_values / image_grid_thw / ... indexed by image, patch or tile; the token-type ids per row and token).
MM_MODEL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "image_position_ids",
    "token_type_ids",
    "mm_token_type_ids",
)
MM_IMAGE_KEYS = MM_MODEL_KEYS[:6]
MM_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")  # (B, P + C): prompt columns, then zeros over the completion
MM_COUNT_KEYS = ("num_images", "num_tiles")  # python lists, one count per row
TRL_EPS = 1e-4  # TRL's advantage epsilon: (r - mean) / (std + 1e-4)


# ---- configuration
@dataclass
class CreditConfig:
    """Credit assignment of a ``CreditGRPOTrainer`` (docs/method.md §7 for the defaults and their reasons).

    algorithm: grpo / dapo / dr_grpo (sequence credit, no reviser), ibpo, diff_feedback, iop.
    The credit flags are those of ``credit_ops.credit_assign`` with its defaults, except ``eps``: None takes
    TRL's 1e-4, so ``algorithm="grpo"`` is TRL's GRPO. ``adv_mode=None`` follows ``GRPOConfig.scale_rewards``
    (group -> grpo, batch -> grpo_batch_std, none -> dr_grpo); ``algorithm="dr_grpo"`` needs
    ``scale_rewards="none"``. ``n_refs``: sibling references per wrong sample (K - 1); the model revisers write one
    revision per reference. ``repair_threshold`` (None: ``threshold``): a repair is verified when the weighted sum
    of the trainer's reward functions reaches it. ``delimiter`` / ``delimiter_ids``: the step ends of
    ``granularity="step"`` (a string is tokenised with the trainer's tokenizer). ``gated_ratio``: IOP's gated
    sequence ratio (the ``gated_gspo`` loss); None turns it on for ``algorithm="iop"`` with
    ``importance_sampling_level="sequence"``; it needs ``use_credit_ops_loss=True``.
    """

    algorithm: str = "ibpo"
    threshold: float = 0.5
    repair_threshold: float | None = None
    rho: float = 0.5
    lam: float = 0.6
    sign_guard: bool = True
    train_on_repair: bool = True
    correct_in_loss: bool | None = None
    max_edit_ratio: float = 0.5
    insert_anchor: str = "prev"
    granularity: str = "token"
    delimiter: str | None = None
    delimiter_ids: Sequence[int] | None = None
    k: int | None = None
    unmasked_weight: float = 0.0
    adv_mode: str | None = None
    eps: float | None = None
    n_refs: int = 2
    gated_ratio: bool | None = None

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"CreditConfig: {msg}")

        need(self.algorithm in ALGORITHMS, f"unknown algorithm {self.algorithm!r}; expected one of {tuple(ALGORITHMS)}")
        need(math.isfinite(self.threshold), f"threshold must be finite, got {self.threshold}")
        need(
            self.repair_threshold is None or math.isfinite(self.repair_threshold),
            f"repair_threshold must be None or finite, got {self.repair_threshold}",
        )
        need(self.max_edit_ratio >= 0, f"max_edit_ratio must be >= 0, got {self.max_edit_ratio}")
        need(
            self.insert_anchor in ("prev", "next", "none"),
            f"insert_anchor must be prev, next or none, got {self.insert_anchor!r}",
        )
        need(self.granularity in ("token", "step"), f"granularity must be 'token' or 'step', got {self.granularity!r}")
        need(
            self.granularity == "token" or self.delimiter is not None or self.delimiter_ids is not None,
            "granularity='step' needs delimiter (a string) or delimiter_ids (the step ends)",
        )
        need(
            self.k is None or (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 0),
            f"k must be None (all regions) or an int >= 0, got {self.k!r}",
        )
        need(0.0 <= self.unmasked_weight <= 1.0, f"unmasked_weight must lie in [0, 1], got {self.unmasked_weight}")
        need(
            self.adv_mode is None or self.adv_mode in ADVANTAGE_MODES,
            f"adv_mode must be None (follow scale_rewards) or one of {ADVANTAGE_MODES}, got {self.adv_mode!r}",
        )
        need(self.eps is None or self.eps >= 0, f"eps must be None (TRL's 1e-4) or >= 0, got {self.eps}")
        need(isinstance(self.n_refs, int) and self.n_refs >= 1, f"n_refs must be an int >= 1, got {self.n_refs!r}")

    @property
    def uses_repairs(self) -> bool:
        return ALGORITHMS[self.algorithm]["masks"]


# ---- revisers
class Reviser(Protocol):
    """Compare-and-correct (docs/method.md §1.3): one entry per wrong sample, each a repaired completion (str), a
    list of them (e.g. one per reference), or None. ``columns`` are the dataset columns of each sample's row."""

    def __call__(
        self, *, prompts: list, completions: list[str], references: list[list[str]], trainer: Any, **columns
    ) -> list[str | list[str] | None]: ...


def _prompt_text(prompt) -> str:
    """The text of a prompt: a string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return ""


def _revision_jobs(template, prompts, completions, references):
    """(sample index, revision prompt text) per (wrong sample, reference). The template's {reference} slot takes the
    whole reference line (REFERENCE_LINE: "Reference: <text>" and a newline), as in the project trainer's prompt."""
    return [
        (i, template.format(prompt=_prompt_text(p), attempt=c, reference=REFERENCE_LINE.format(reference=r)))
        for i, (p, c, refs) in enumerate(zip(prompts, completions, references, strict=True))
        for r in refs
    ]


def _collect(jobs, texts, n) -> list[list[str]]:
    out = [[] for _ in range(n)]
    for (i, _), text in zip(jobs, texts, strict=False):
        out[i].append(text.strip())
    return out


def _prompt_images(prompt) -> list[dict]:
    """The image blocks ({"type": "image", "image": <PIL image>}) of a conversational prompt, in order; TRL puts a
    row's "image" / "images" there (prepare_multimodal_messages) before generating and scoring."""
    if isinstance(prompt, str):
        return []
    return [
        part
        for message in prompt
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image"
    ]


class PolicyReviser:
    """The policy itself in a revision prompt holding the wrong attempt and one sibling reference (one revision per
    reference), generated through the trainer's own backend (transformers, continuous batching or vLLM) with its
    generation settings (temperature, ``max_completion_length``, ...). Every process generates the same number of
    prompts (padded), as that backend's collectives require. With a vision-language model the revision prompt is a
    user turn holding the sample's images, then the revision text: TRL's own tokenisation and generation with
    images (``_tokenize_prompts`` -> ``_generate_single_turn``), as for the samples."""

    def __init__(self, template: str = REVISION_PROMPT):
        self.template = template

    def __call__(self, *, prompts, completions, references, trainer, **columns):
        jobs = _revision_jobs(self.template, prompts, completions, references)
        conversational = bool(prompts) and not isinstance(prompts[0], str)
        counts = gather_object([len(jobs)])
        n = max(max(counts), 1)
        texts = [text for _, text in jobs]
        images = [_prompt_images(prompts[i]) for i, _ in jobs]
        texts += [texts[-1] if texts else self.template.format(prompt="", attempt="", reference="")] * (n - len(texts))
        images += [images[-1] if images else []] * (n - len(images))
        if conversational:
            gen_prompts = [
                [{"role": "user", "content": [*ims, {"type": "text", "text": t}] if ims else t}]
                for t, ims in zip(texts, images, strict=True)
            ]
        else:
            gen_prompts = texts
        prompt_ids, prompt_images, multimodal_fields = trainer._tokenize_prompts(gen_prompts)
        completion_ids, _ = trainer._generate_single_turn(prompt_ids, prompt_images, multimodal_fields, 1)
        decoded = trainer._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return _collect(jobs, decoded[: len(jobs)], len(prompts))


class ExternalReviser:
    """A frozen local model (``model.generate``) in the revision prompt; one revision per reference. Its tokenizer
    may differ from the policy's: the repair is handed back as text and re-encoded with the policy's tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = REVISION_PROMPT,
        max_new_tokens: int = 48,
        temperature: float = 0.7,
        batch_size: int = 16,
    ):
        self.model, self.tokenizer, self.template = model.eval().requires_grad_(False), tokenizer, template
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size

    @torch.no_grad()
    def __call__(self, *, prompts, completions, references, trainer, **columns):
        jobs = _revision_jobs(self.template, prompts, completions, references)
        tok, device = self.tokenizer, next(self.model.parameters()).device
        texts = []
        for start in range(0, len(jobs), self.batch_size):
            batch = [text for _, text in jobs[start : start + self.batch_size]]
            if getattr(tok, "chat_template", None):
                batch = [
                    tok.apply_chat_template(
                        [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
                    )
                    for t in batch
                ]
            side, tok.padding_side = tok.padding_side, "left"
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            tok.padding_side = side
            sample = self.temperature > 0
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=sample,
                temperature=self.temperature if sample else None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return _collect(jobs, texts, len(prompts))


class OracleReviser:
    """A task oracle: ``fn(prompt, completion, **row) -> str | None`` writes one repair per wrong sample (no
    reference needed), e.g. the minimal repair of a task with checkable steps (credit_ops.trainer.tasks.oracle_repair
    keeps the correct prefix of steps and rewrites from the first wrong one)."""

    def __init__(self, fn: Callable[..., str | None]):
        self.fn = fn

    def __call__(self, *, prompts, completions, references, trainer, **columns):
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(prompts))]
        return [self.fn(p, c, **row) for p, c, row in zip(prompts, completions, rows, strict=True)]


def _check_repairs(out, n: int) -> list[list[str]]:
    """The reviser's output as one list of repair strings per wrong sample, or a clear error."""
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"the reviser must return a list with one entry per wrong sample, got {type(out).__name__}")
    if len(out) != n:
        raise ValueError(
            f"the reviser returned {len(out)} entries for {n} wrong samples; it must return exactly one entry per "
            "wrong sample (a repaired completion string, a list of them, or None)"
        )
    repairs = []
    for i, entry in enumerate(out):
        items = [] if entry is None else [entry] if isinstance(entry, str) else entry
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            bad = entry if not isinstance(items, (list, tuple)) else next(s for s in items if not isinstance(s, str))
            raise TypeError(
                f"the reviser's entry {i} holds a {type(bad).__name__}; each entry must be a repaired completion "
                "string, a list of strings, or None"
            )
        repairs.append(list(items))
    return repairs


# ---- the trainer
class CreditGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with process-level credit assignment (module docstring). Takes every GRPOTrainer argument
    plus ``credit`` (a CreditConfig; default IBPO), ``reviser`` (default PolicyReviser() for the algorithms that
    use repairs; ignored by grpo / dapo / dr_grpo) and ``use_credit_ops_loss``. Every option that cannot be honoured
    exactly raises a ValueError naming it, at construction.

    After each generation batch, ``self.credit_last`` holds the CreditAssignment of the whole (gathered) batch.
    """

    def __init__(
        self,
        *args,
        credit: CreditConfig | None = None,
        reviser: Reviser | Callable | None = None,
        use_credit_ops_loss: bool = False,
        **kwargs,
    ):
        low, high = SUPPORTED_TRL
        if not (Version(low) <= Version(trl.__version__) < Version(high)):
            raise RuntimeError(
                f"CreditGRPOTrainer supports TRL >= {low}, < {high} (it overrides private GRPOTrainer methods); "
                f"trl {trl.__version__} is installed: pip install 'trl>={low},<{high}'"
            )
        credit = CreditConfig() if credit is None else credit
        if not isinstance(credit, CreditConfig):
            raise TypeError(f"credit must be a CreditConfig, got {type(credit).__name__}")
        if reviser is not None and not callable(reviser):
            raise TypeError(f"reviser must be callable, got {type(reviser).__name__}")
        if credit.uses_repairs and reviser is None:
            reviser = PolicyReviser()
        if not credit.uses_repairs and reviser is not None:
            warnings.warn(f"algorithm={credit.algorithm!r} uses no repairs: the reviser is not run", stacklevel=2)
            reviser = None
        self.credit, self.reviser, self.use_credit_ops_loss = credit, reviser, bool(use_credit_ops_loss)
        self.credit_last = None
        self._credit_capture = None
        super().__init__(*args, **kwargs)
        self._check_credit_options()
        self._credit_redirect = _ForwardRedirection()

    # -- validation (before any training)
    def _check_credit_options(self):
        c = self.credit

        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(
            self.multi_objective_aggregation == "sum_then_normalize",
            "multi_objective_aggregation='normalize_then_sum' is not supported by CreditGRPOTrainer: credit_assign "
            "normalises one reward per sample (the weighted sum of the reward functions); use 'sum_then_normalize'",
        )
        if c.adv_mode is None:
            need(
                c.algorithm != "dr_grpo" or self.scale_rewards == "none",
                f"algorithm='dr_grpo' normalises without the std; set GRPOConfig(scale_rewards='none') (TRL's "
                f"spelling of the same), got scale_rewards={self.scale_rewards!r}",
            )
            self._adv_mode = SCALE_REWARDS_MODE[self.scale_rewards]
        else:
            self._adv_mode = c.adv_mode
        self._eps = TRL_EPS if c.eps is None else c.eps
        self._repair_threshold = c.threshold if c.repair_threshold is None else c.repair_threshold
        if c.delimiter_ids is not None:
            self._delimiter_ids = [int(i) for i in c.delimiter_ids]
        elif c.delimiter is not None:
            self._delimiter_ids = self._tokenizer(c.delimiter, add_special_tokens=False)["input_ids"]
        else:
            self._delimiter_ids = None

        if c.uses_repairs:
            need(
                not self.tools and self.environment_factories is None,
                f"algorithm={c.algorithm!r} with tools or environment_factory is not supported: tool outputs inside "
                "a completion cannot be revised",
            )
            need(
                not (self._is_vlm and isinstance(self.reviser, ExternalReviser)),
                "ExternalReviser is text-only (its model and tokenizer never see the image), so with a "
                "vision-language model its repairs of an image task would be blind: use PolicyReviser() (the policy "
                "with the sample's image in the revision prompt), OracleReviser(fn), or a reviser of your own (the "
                "prompts it gets hold the images)",
            )
            if c.train_on_repair:
                need(
                    self.loss_type in TOKEN_MEAN_LOSSES,
                    f"CreditConfig(train_on_repair=True) needs a token-mean loss_type {TOKEN_MEAN_LOSSES}: "
                    f"loss_type={self.loss_type!r} averages over rows, so the extra repair rows would change it; "
                    "set train_on_repair=False or use loss_type='dapo'",
                )
        gated = c.gated_ratio
        if gated is None:
            gated = c.algorithm == "iop" and self.importance_sampling_level == "sequence"
        need(
            not gated or self.importance_sampling_level == "sequence",
            "CreditConfig(gated_ratio=True) is IOP's gated sequence ratio: set importance_sampling_level='sequence'",
        )
        need(
            not gated or self.use_credit_ops_loss,
            "IOP's gated sequence ratio (the gated_gspo loss: the ratio averages the log-ratio over gated tokens "
            "only) cannot be expressed through TRL's loss, which takes gates only as factors of the advantages: "
            "pass use_credit_ops_loss=True, or CreditConfig(gated_ratio=False) for GSPO with the gates folded in",
        )
        self._gated_ratio = gated
        if self.use_credit_ops_loss:
            self._check_credit_loss_options()

    def _check_credit_loss_options(self):
        args = self.args
        bad = []
        if self.loss_type not in CREDIT_LOSS_AGG:
            bad.append(f"loss_type={self.loss_type!r} (supported: {', '.join(CREDIT_LOSS_AGG)})")
        if self.top_entropy_quantile < 1.0:
            bad.append(f"top_entropy_quantile={self.top_entropy_quantile} (the entropy mask needs the entropies first)")
        if self._entropy_bonus_enabled:
            bad.append("entropy_coef / use_adaptive_entropy (credit_ops returns the entropy detached)")
        if self.off_policy_mask_threshold is not None:
            bad.append("off_policy_mask_threshold (the off-policy mask needs the current log-probs first)")
        if self.beta != 0.0 and args.use_bias_correction_kl:
            bad.append("beta > 0 with use_bias_correction_kl=True, TRL's default (the KL term times the ratio)")
        if self.aux_loss_enabled:
            bad.append("a MoE router aux loss (router_aux_loss_coef != 0)")
        if args.delta is not None and not args.delta > 1 + self.epsilon_high:
            bad.append(f"delta={args.delta} <= 1 + epsilon_high (delta is credit_ops' dual_clip only above that)")
        text_config = self.model.config.get_text_config()
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            bad.append("a model with final_logit_softcapping")
        scale = [
            getattr(text_config, name, None) for name in ("logit_scale", "output_multiplier", "lm_head_multiplier")
        ]
        if any(s is not None and s != 1 for s in scale) or getattr(text_config, "logits_scaling", None) not in (
            None,
            1,
        ):
            bad.append("a model that scales its logits (logit_scale, lm_head_multiplier, logits_scaling)")
        if bad:
            raise ValueError(
                "use_credit_ops_loss=True cannot reproduce these TRL options exactly: "
                + "; ".join(bad)
                + ". Turn them off or use TRL's loss (use_credit_ops_loss=False)."
            )

    # -- generation batch: capture TRL's own reward call, then assign credit
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._credit_capture == {}:  # the batch's own call (not a repair verification)
            self._credit_capture = dict(inputs=inputs, prompts=prompts, completions=completions, rpf=rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:  # evaluation: TRL's sequence advantages, no revisions
            return super()._generate_and_score_completions(inputs)
        self._credit_capture = {}
        try:
            out = super()._generate_and_score_completions(inputs)
            batch = self._credit_capture
        finally:
            self._credit_capture = None
        return self._assign_credit(out, batch)

    def _assign_credit(self, out: dict, batch: dict) -> dict:
        c, acc, device = self.credit, self.accelerator, self.accelerator.device
        rank, world = acc.process_index, acc.num_processes
        B = out["completion_ids"].shape[0]
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        lengths = acc.gather(mask.sum(1).long())  # (N,)
        rpf = batch["rpf"]  # (N, n_funcs), gathered by TRL
        N, G = rpf.shape[0], self.num_generations
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(1)
        scorable = ~torch.isnan(rpf).all(1)
        group_ids = torch.arange(N, device=device) // G  # TRL's groups: num_generations consecutive rows

        tokens = out["completion_ids"]  # (N, C): the completions of every process, right-padded
        if world > 1:
            tokens = acc.gather(acc.pad_across_processes(tokens, dim=1, pad_index=self._tokenizer.pad_token_id))
        repairs = self._revise(batch, tokens, rewards, scorable, lengths) if self.reviser is not None else []
        rep = dict(repair_tokens=None, repair_lengths=None, repair_of=None, repair_correct=None)
        if repairs:
            rep = dict(
                repair_tokens=_pad_rows([r[1] for r in repairs], self._tokenizer.pad_token_id, device),
                repair_lengths=torch.tensor([len(r[1]) for r in repairs], device=device),
                repair_of=torch.tensor([r[0] for r in repairs], device=device),
                repair_correct=torch.tensor([r[2] for r in repairs], device=device),
            )
        # Rows no reward function could score (all None): TRL leaves them out of every statistic and gives them
        # advantage 0. credit_assign runs on the others; their rows are scattered back, zero.
        keep = scorable.to(device).nonzero().flatten()
        sub = (lambda x: x) if len(keep) == N else (lambda x: x[keep])
        sub_rep = dict(rep)
        if repairs and len(keep) < N:  # repairs are only ever of scorable rows
            sub_rep["repair_of"] = torch.full((N,), -1, dtype=torch.long, device=device).index_copy(
                0, keep, torch.arange(len(keep), device=device)
            )[rep["repair_of"]]
        ca = credit_ops.credit_assign(
            sub(tokens),
            sub(lengths.to(device)),
            sub(group_ids),
            sub(rewards.to(device)),
            **sub_rep,
            algorithm=c.algorithm,
            num_groups=N // G,
            granularity=c.granularity,
            delimiter_ids=self._delimiter_ids,
            rho=c.rho,
            lam=c.lam,
            threshold=c.threshold,
            sign_guard=c.sign_guard,
            train_on_repair=c.train_on_repair,
            correct_in_loss=c.correct_in_loss,
            max_edit_ratio=c.max_edit_ratio,
            insert_anchor=c.insert_anchor,
            k=c.k,
            unmasked_weight=c.unmasked_weight,
            adv_mode=self._adv_mode,
            eps=self._eps,
        )
        if len(keep) < N:
            ca = _scatter_rows(ca, keep, N, rep["repair_of"])
        self.credit_last = ca
        rows = slice(rank * B, (rank + 1) * B)
        width = out["completion_ids"].shape[1]
        out["advantages"] = _fit(ca.advantages[rows], width)
        out["credit_gates"] = _fit(ca.gates[rows], width)
        # TRL's completions table: the credit sequence advantages instead of its own (B,) ones
        logged = self._logs["advantages"]
        for _ in range(min(N, len(logged))):
            logged.pop()
        logged.extend(ca.seq_advantages.tolist())

        n_rows = 0
        if repairs and c.train_on_repair:
            n_rows = self._append_repair_rows(out, ca, rep["repair_lengths"], rows)
        metrics = self._metrics["train"]
        m = {k: float(v) for k, v in ca.metrics.items()}
        metrics["credit/seq_advantage_mean"].append(float(ca.seq_advantages.float().mean()))
        metrics["credit/active_tokens"].append(m["active_token_ratio"])
        if c.uses_repairs:
            metrics["credit/repair_success"].append(m["repair_success_rate"])
            metrics["credit/repair_verified"].append(m["repair_verified_rate"])
            metrics["credit/rejected_repairs"].append(m["rejected_repairs"])
            metrics["credit/edit_distance"].append(m["mean_edit_distance"])
            metrics["credit/phi"].append(m["phi_mean"])
            metrics["credit/revisions"].append(float(len(repairs)))
            metrics["credit/repair_rows"].append(float(acc.gather(torch.tensor([n_rows], device=device)).sum()))
        return out

    def _revise(self, batch, tokens, rewards, scorable, lengths) -> list[tuple[int, list[int], bool]]:
        """Revise every wrong sample of the global batch, verify the repairs; (sample, repair ids, verified)."""
        acc, c = self.accelerator, self.credit
        rank, world = acc.process_index, acc.num_processes
        gather = gather_object if world > 1 else (lambda x: x)
        # the rows whole, images included: the repairs' reward call passes TRL's dataset columns, as its own does
        prompts, rows = gather(list(batch["prompts"])), gather([dict(x) for x in batch["inputs"]])
        completions = [_completion_text(x) for x in gather(list(batch["completions"]))]
        N, G = tokens.shape[0], self.num_generations
        r = rewards.tolist()
        ok, n_tok = scorable.tolist(), lengths.tolist()
        ids = [row[:n] for row, n in zip(tokens.tolist(), n_tok, strict=True)]
        wrong = [i for i in range(N) if ok[i] and r[i] < c.threshold and n_tok[i] > 0]
        if not wrong:
            return []
        per = -(-len(wrong) // world)
        mine = wrong[rank * per : (rank + 1) * per]
        share = mine + [wrong[0]] * (per - len(mine))  # equal shares: generation may be a collective
        refs = []
        for i in share:
            sib = [j for j in range(i - i % G, i - i % G + G) if j != i and ok[j]]
            sib.sort(key=lambda j: -r[j])  # correct siblings first (higher reward first), ties in sampling order
            refs.append([completions[j] for j in sib[: c.n_refs]])
        keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")]
        columns = {k: [rows[i].get(k) for i in share] for k in keys}
        out = self.reviser(
            prompts=[prompts[i] for i in share],
            completions=[completions[i] for i in share],
            references=refs,
            trainer=self,
            **columns,
        )
        texts = _check_repairs(out, len(share))[: len(mine)]
        local = [(i, text) for i, group in zip(mine, texts, strict=True) for text in group]

        # Verify with the trainer's own reward functions (TRL's reward call, padded to equal counts per process).
        counts = gather([len(local)])
        most = max(counts)
        if most == 0:
            return []
        pad_i = wrong[0]
        items = local + [(pad_i, completions[pad_i])] * (most - len(local))
        rep_ids = [self._encode_repair(text, ids[i]) for i, text in items]
        conversational = not isinstance(prompts[0], str)
        rep_completions = [[{"role": "assistant", "content": t}] if conversational else t for _, t in items]
        saved = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = type(saved[0])(list), type(saved[1])(list)
        try:
            rpf = self._calculate_rewards(
                [rows[i] for i, _ in items], [prompts[i] for i, _ in items], rep_completions, rep_ids
            )
        finally:
            self._pending_extra_logs, self._pending_metrics = saved
        scores = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(1)
        verified = (scores >= self._repair_threshold) & ~torch.isnan(rpf).all(1)
        everyone = gather([(i, rid) for (i, _), rid in zip(local, rep_ids, strict=False)])
        out, start = [], 0
        for p, n in enumerate(counts):
            for j in range(n):
                i, rid = everyone[start + j]
                out.append((i, rid, bool(verified[p * most + j])))
            start += n
        return out

    def _encode_repair(self, text: str, sample_ids: list[int]) -> list[int]:
        """Policy-token ids of a repair: the sample's own ids for the longest prefix whose text the repair keeps
        (re-tokenising it could change the ids of unchanged text), the rest encoded, EOS appended."""
        tok = self._tokenizer
        content = list(sample_ids)
        if content and content[-1] in self.eos_token_ids:
            content = content[:-1]
        lo, hi = 0, len(content)
        while lo < hi:  # longest k with decode(content[:k]) a prefix of the repair
            mid = (lo + hi + 1) // 2
            if text.startswith(tok.decode(content[:mid], skip_special_tokens=True)):
                lo = mid
            else:
                hi = mid - 1
        rest = text[len(tok.decode(content[:lo], skip_special_tokens=True)) :]
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.eos_token_ids[0]
        return content[:lo] + (tok(rest, add_special_tokens=False)["input_ids"] if rest else []) + [eos]

    def _append_repair_rows(self, out: dict, ca, repair_lengths: Tensor, rows: slice) -> int:
        """The chosen repairs of this process's samples as extra rows (docs/method.md §1.6), padded with empty rows
        to a multiple of steps_per_generation (TRL splits the batch evenly). Exact for token-mean losses only."""
        acc, device = self.accelerator, self.accelerator.device
        B = out["completion_ids"].shape[0]
        sel = (ca.repair_selected & (ca.repair_of >= rows.start) & (ca.repair_of < rows.stop)).nonzero().flatten()
        spg = self.args.steps_per_generation
        n = sel.numel()
        # The same row count on every process: the old / reference passes below are collectives under FSDP / ZeRO-3.
        n_max = max(gather_object([n])) if acc.num_processes > 1 else n
        R = -(-n_max // spg) * spg
        if R == 0:
            _set_num_items(out, acc)
            return 0
        src = torch.cat([ca.repair_of[sel] - rows.start, sel.new_zeros(R - n)])  # local sample of each row
        width = int(ca.repair_tokens.shape[1])
        rep_len = torch.cat([repair_lengths[sel].long(), repair_lengths.new_zeros(R - n, dtype=torch.long)])
        rep_ids = torch.full((R, width), self._tokenizer.pad_token_id, dtype=out["completion_ids"].dtype, device=device)
        rep_ids[:n] = ca.repair_tokens[sel].to(rep_ids.dtype)
        valid = torch.arange(width, device=device) < rep_len.unsqueeze(1)
        rep_mask = valid.to(out["completion_mask"].dtype)
        rep_adv = torch.zeros(R, width, dtype=out["advantages"].dtype, device=device)
        rep_adv[:n] = ca.repair_advantages[sel].to(rep_adv.dtype)
        rep_gates = torch.zeros_like(rep_adv)
        rep_gates[:n] = ca.repair_gates[sel].to(rep_gates.dtype)

        prompt_ids, prompt_mask = out["prompt_ids"][src], out["prompt_mask"][src]
        mm = _multimodal_rows(out, src, width)  # VLMs: each repair row sees its sample's images
        new = {"completion_ids": rep_ids, "completion_mask": rep_mask, "advantages": rep_adv, "credit_gates": rep_gates}
        if "old_per_token_logps" in out or "ref_per_token_logps" in out or "sampling_per_token_logps" in out:
            ids = torch.cat([prompt_ids, rep_ids], 1)
            attn = torch.cat([prompt_mask, rep_mask], 1)
            bs = self.args.per_device_train_batch_size
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                old = None
                if "old_per_token_logps" in out or "sampling_per_token_logps" in out:
                    old, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, ids, attn, width, batch_size=bs, **mm
                    )
                    if "old_per_token_logps" in out:
                        new["old_per_token_logps"] = old
                    if "sampling_per_token_logps" in out:
                        new["sampling_per_token_logps"] = old  # repairs were not sampled: no IS correction
                if "ref_per_token_logps" in out:
                    if self.ref_model is not None:
                        ref, _, _ = self._get_per_token_logps_and_entropies(
                            self.ref_model, ids, attn, width, batch_size=bs, **mm
                        )
                    else:
                        model = self.accelerator.unwrap_model(self.model)
                        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                            ref, _, _ = self._get_per_token_logps_and_entropies(
                                self.model, ids, attn, width, batch_size=bs, **mm
                            )
                    new["ref_per_token_logps"] = ref
        if "importance_sampling_ratio" in out:
            isr = out["importance_sampling_ratio"]
            new["importance_sampling_ratio"] = isr.new_ones((R, 1) if isr.shape[1] == 1 else (R, width))
        W = max(width, out["completion_ids"].shape[1])
        pads = {"completion_ids": self._tokenizer.pad_token_id}
        for key, value in new.items():
            a, b = out[key], value
            if a.dim() == 2 and a.shape[1] != 1:
                a, b = _fit(a, W, pads.get(key, 0)), _fit(b, W, pads.get(key, 0))
            out[key] = torch.cat([a, b.to(a.dtype)], 0)
        P = out["prompt_ids"].shape[1]
        for key, value in mm.items():  # the repair rows' images (flat: after the samples') and token types
            a = out[key]
            if key in MM_TOKEN_KEYS:  # (rows, P + completion width): the completion part cut or padded to W
                a, value = (torch.cat([x[:, :P], _fit(x[:, P:], W)], 1) for x in (a, value))
            out[key] = a + value if isinstance(a, list) else torch.cat([a, value.to(a.dtype)], 0)
        out["prompt_ids"] = torch.cat([out["prompt_ids"], prompt_ids], 0)
        out["prompt_mask"] = torch.cat([out["prompt_mask"], prompt_mask], 0)
        for key, value in out.items():  # a per-row field this adapter does not know would be misaligned
            if key in MM_IMAGE_KEYS and key in mm:  # indexed by image / patch / tile, extended above
                continue
            if isinstance(value, (Tensor, list)) and (not isinstance(value, Tensor) or value.dim() > 0):
                if len(value) != B + R:
                    raise ValueError(f"train_on_repair: cannot extend the batch field {key!r} to the repair rows")
        _set_num_items(out, acc)
        return n

    # -- the loss
    def _compute_loss(self, model, inputs):
        if not self.use_credit_ops_loss:
            return super()._compute_loss(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped is model:
            return self._credit_loss(unwrapped, inputs)
        # Through the wrapper's forward (DDP / FSDP / DeepSpeed hooks), as TRL's former fused-loss path did.
        return self._credit_redirect(model, unwrapped, self._credit_loss, unwrapped, inputs)

    def _credit_loss(self, unwrapped, inputs):
        mode = "train" if self.model.training else "eval"
        hf = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        C = completion_ids.shape[1]
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        # VLMs: the image inputs go to the backbone as TRL's fused head passes them (the whole micro-batch is one
        # chunk there, so every field whole); no position_ids, the model computes its own (mrope for Qwen-VL)
        mm = {k: inputs[k] for k in MM_MODEL_KEYS if inputs.get(k) is not None}
        with self.accelerator.autocast():
            backbone = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **mm)
        hidden = backbone.last_hidden_state[:, -C - 1 : -1]  # (B, C, H): position t scores completion token t
        head = hf.get_output_embeddings()
        autocast = torch.autocast(hidden.device.type, enabled=False) if self.args.cast_lm_head_to_fp32 else None
        if autocast is not None:
            hidden = hidden.float()

        advantages = inputs["advantages"]
        gates = None
        if self._gated_ratio and "credit_gates" in inputs:
            gates = inputs["credit_gates"]
            # the gate enters the ratio and multiplies the token loss: hand over the advantages without it
            advantages = torch.where(gates > 0, advantages / gates.clamp(min=1e-30), 0.0)
        if "importance_sampling_ratio" in inputs:  # TRL's vLLM IS correction, folded in (exact: it is >= 0)
            advantages = (advantages if advantages.dim() == 2 else advantages.unsqueeze(1)) * inputs[
                "importance_sampling_ratio"
            ]
            advantages = advantages.expand(completion_ids.shape).contiguous()
        if self._gated_ratio:
            loss_type = "gated_gspo"
        else:
            loss_type = "gspo" if self.importance_sampling_level == "sequence" else "dapo"
        kwargs = dict(
            bias=head.bias,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            mask=mask,
            gates=gates,
            loss_type=loss_type,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            dual_clip=self.args.delta,
            beta=self.beta,
            kl_type="k3",
            agg=CREDIT_LOSS_AGG[self.loss_type],
            max_length=self.max_completion_length,
            temperature=self.temperature,
        )
        ctx = autocast if autocast is not None else contextlib.nullcontext()
        with ctx:
            loss, stats = credit_ops.fused_linear_policy_loss(hidden, head.weight, completion_ids, advantages, **kwargs)
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss * stats["num_tokens"].clamp(min=1.0) / normalizer
        else:
            loss = loss / ga
        self._log_credit_loss_stats(mode, stats)
        return loss

    def _log_credit_loss_stats(self, mode, stats):
        """TRL's loss metrics from credit_ops' statistics: token-weighted means over all processes."""
        n = stats["num_tokens"].float()
        names = dict(
            clip_frac_low="clip_ratio/low_mean",
            clip_frac_high="clip_ratio/high_mean",
            clip_frac="clip_ratio/region_mean",
        )
        keys = ["entropy_mean", *names] + (["kl_mean"] if self.beta != 0.0 else [])
        local = torch.stack([stats[k].float() * n for k in keys] + [n])
        totals = self.accelerator.reduce(local, reduction="sum")
        means = (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()
        for key, value in zip(keys, means, strict=True):
            self._metrics[mode][{"entropy_mean": "entropy", "kl_mean": "kl", **names}[key]].append(value)


# ---- helpers
def _pad_rows(rows: list[list[int]], pad_id: int, device) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)


def _fit(x: Tensor, width: int, fill=0) -> Tensor:
    """x (B, T) cut or right-padded to width."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), fill)], 1)


def _completion_text(c) -> str:
    return c if isinstance(c, str) else c[0]["content"] if c else ""


def _scatter_rows(ca, keep: Tensor, N: int, repair_of: Tensor | None):
    """A CreditAssignment of the rows ``keep`` as one of all N rows (the others zero / False / -1)."""

    def full(x: Tensor, fill=0) -> Tensor:
        return x.new_full((N, *x.shape[1:]), fill).index_copy(0, keep, x)

    per_row = ("advantages", "gates", "seq_advantages", "shaped_rewards", "phi", "wrong", "has_repair", "masks")
    fields = {name: full(getattr(ca, name)) for name in per_row}
    fields["repair_index"] = full(ca.repair_index, -1)
    if repair_of is not None:
        fields["repair_of"] = repair_of.long()
    return ca._replace(**fields)


def _multimodal_rows(out: dict, src: Tensor, width: int) -> dict:
    """The multimodal inputs of rows that reuse the images of the samples ``src`` (R,) of TRL's batch ``out`` (a
    repair is scored in its sample's prompt, image included), in TRL's layout and ready for
    ``_get_per_token_logps_and_entropies``: the image-indexed fields regathered per sample with TRL's own
    ``split_pixel_values_by_grid`` (for Qwen-VL: pixel blocks by ``image_grid_thw.prod(-1)`` and ``num_images``),
    then flat again; the token-type ids (R, P + width): the sample's prompt columns, zeros over the completion;
    ``num_images`` / ``num_tiles`` per row. {} for a text batch."""
    keys = [k for k in (*MM_MODEL_KEYS, *MM_COUNT_KEYS) if out.get(k) is not None]
    if not keys:
        return {}
    B, P = out["prompt_ids"].shape
    idx = src.tolist()
    per_sample = split_pixel_values_by_grid({k: out[k] for k in keys})
    rows = {}
    for key in keys:
        value = per_sample[key]
        if key in MM_TOKEN_KEYS:
            rows[key] = torch.cat([value[src, :P], value.new_zeros(len(idx), width)], 1)
        elif isinstance(value, list):  # one entry per sample: a count, or the sample's block of a split field
            rows[key] = [value[i] for i in idx]
        elif key in ("pixel_values", "pixel_attention_mask") and value.shape[0] == B:  # padded, one row per sample
            rows[key] = value[src]
        else:
            raise ValueError(
                f"train_on_repair: cannot regather the multimodal field {key!r} (shape {tuple(value.shape)}) by "
                "sample for the repair rows of this model; set CreditConfig(train_on_repair=False)"
            )
    return unsplit_pixel_values_by_grid(rows)


def _set_num_items(out: dict, acc) -> None:
    mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
    out["num_items_in_batch"] = acc.gather(mask.sum()).sum()
