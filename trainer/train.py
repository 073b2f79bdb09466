"""The training loop: rollout -> verify -> revise -> credit -> policy loss, under accelerate.

One step, per process (docs/method.md §1):
    B problems, G samples each          rollout.rollout            N = B * G completions
    rewards                             rewards.Verifier           (N,)
    repairs of the wrong samples        revise.*                   M repairs (credit methods only)
    advantages, gates, repair rows      credit.assign              (N + R, C)
    old-policy log-probs                the sampling model         (N + R, C), no gradient; ppo_epochs > 1 only
    policy update                       loss.policy_loss           micro-batches, token-normalised
The data position and the sampling RNG are functions of (seed, step, rank), so a resumed run replays exactly.
"""

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import signal
import time
import warnings

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed

from . import credit as credit_mod
from .config import ConfigError, to_dict, to_yaml
from .launch import process_count_problem
from .loss import head_logprobs, loss_settings, loss_tokens, normaliser, policy_loss
from .modeling import char_tokenizer, load_pretrained, tiny_model, warm_seed, warm_start
from .report import append_jsonl, read_jsonl, write_atomic, write_jsonl
from .revise import REFERENCE_LINE, REVISION_PROMPT, build_reviser, revision_examples, verified_truncation
from .rewards import Verifier, is_correct
from .rollout import generate, pack, rollout, sampling, sequence_logprobs
from .tasks import build_task
from .vision import build_vlm, is_vlm, prompt_inputs
from .visual_task import VISUAL_TASKS, build_visual_task


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (cfg.max_skipped_steps)."""


def _trackers():
    try:
        import tensorboard  # noqa: F401

        return ["tensorboard"]
    except ImportError:
        return []


def build_model(cfg, task, log):
    """(model, tokenizer): a local HF model, or the embedded tiny model after its warm start."""
    if is_vlm(cfg):  # a vision-language model (trainer/vision.py): its own loader and warm start
        return build_vlm(cfg, task, log)
    if cfg.model.path:
        return load_pretrained(cfg.model.path, cfg.model.gguf_file or None)
    tok = char_tokenizer()
    set_seed(warm_seed(cfg))  # the initial weights
    model = tiny_model(cfg, tok)
    # the warm start also teaches the revision mode (every method starts from the same model), where the task
    # can make wrong attempts to repair
    revisions = (lambda gen, n: revision_examples(task, n, gen)) if task.checkable else None
    if revisions is None and cfg.uses_repairs and cfg.revise.reviser == "policy":
        warnings.warn(
            f"task {task.name!r} has no checkable steps: the warm start cannot teach the revision mode, so the "
            "embedded policy's revisions will rarely verify (revise.reviser=policy)",
            stacklevel=2,
        )
    warm_start(model, tok, task, cfg, log=log, revisions=revisions, revision_format=REVISION_PROMPT + REFERENCE_LINE)
    return model, tok


@torch.no_grad()
def evaluate(model, tok, task, verifier, cfg, device, samples_per_prompt: int = 0) -> dict:
    """Accuracy on a fixed held-out set of prompts (the task's eval split, which training never samples: up to
    cfg.eval_prompts distinct problems drawn with a generator seeded by the run's seed): greedy, and, with
    samples_per_prompt > 0, sampled at the rollout temperature. Leaves the training RNG untouched."""
    probs = task.sample(cfg.eval_prompts, torch.Generator().manual_seed(10**6 + cfg.seed), split="eval")
    prompts, images = prompt_inputs(tok, probs)  # images: None for text problems
    r = cfg.rollout
    greedy = dict(n=1, max_new_tokens=r.max_new_tokens, temperature=1.0, do_sample=False, device=device)
    _, texts = generate(model, tok, prompts, images=images, **greedy)
    out = {"eval_accuracy": _accuracy(verifier, probs, texts)}
    if images is not None:  # the guard that the policy reads the image: each prompt with the next one's image
        _, texts = generate(model, tok, prompts, images=images[1:] + images[:1], **greedy)
        out["eval_shuffled_accuracy"] = _accuracy(verifier, probs, texts)
    if samples_per_prompt:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(10**6 + cfg.seed)
            _, texts = generate(model, tok, prompts, n=samples_per_prompt, device=device, images=images, **sampling(r))
        per = [probs[i // samples_per_prompt] for i in range(len(texts))]
        out["eval_sampled_accuracy"] = _accuracy(verifier, per, texts)
    return out


def _accuracy(verifier, problems, texts) -> float:
    return sum(is_correct(verifier(p, t)) for p, t in zip(problems, texts, strict=True)) / len(texts)


def _kill_point(phase: str, step: int) -> None:
    """Test-only fault injection: CREDIT_OPS_TEST_KILL_AT=<phase>:<step> SIGKILLs this process when it reaches
    `phase` (rollout | revise | update | metrics | checkpoint) of step `step` (1-based, the step being made)."""
    at = os.environ.get("CREDIT_OPS_TEST_KILL_AT")
    if at and at == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint directory `path` cannot be loaded (None: complete). A complete checkpoint has a
    trainer_state.json (written last, with the size of every other file) whose sizes match, and safetensors files
    whose headers cover them; a partial or truncated one fails one of these."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (partially written)"
    try:
        with open(state) as f:
            st = json.load(f)
        st["step"], st["history"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable trainer_state.json ({e!r})"
    # checkpoints from before the size manifest: only their safetensors headers are checked
    files = st.get("files") or {n: None for n in os.listdir(path) if n.endswith(".safetensors")}
    for name, size in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if size is not None and os.path.getsize(p) != size:
            return f"{name} has {os.path.getsize(p)} bytes, expected {size} (truncated or corrupt)"
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(p, "pt"):
                    pass
            except Exception as e:  # SafetensorError: incomplete metadata, ...
                return f"{name}: {e}"
    return None


def _checkpoints(run_dir) -> list[tuple[int, str]]:
    """(step, path) of the run's step_N checkpoint directories, oldest first (temporary ones excluded)."""
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    out = []
    for d in os.listdir(ck):
        if d.startswith("step_") and d[5:].isdigit() and os.path.isdir(os.path.join(ck, d)):
            out.append((int(d[5:]), os.path.join(ck, d)))
    return sorted(out)


def _latest_checkpoint(run_dir):
    """The newest complete checkpoint; partial or corrupt ones are skipped with a warning, never loaded."""
    for _, path in reversed(_checkpoints(run_dir)):
        why = checkpoint_problem(path)
        if why is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {why}", stacklevel=2)
    return None


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_checkpoint(tmp: str, final: str, state: dict) -> None:
    """Seal the checkpoint written to `tmp` and move it to `final` atomically: trainer_state.json (with every
    file's size) is written last and fsynced, then the directory is renamed. A kill at any point leaves either
    the old `final` or the new one, never a partial one under a step_N name."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        p = os.path.join(tmp, name)
        if os.path.isfile(p):
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = os.path.getsize(p)
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({**state, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): move the old one aside first
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def drop_tied_duplicates(models, weights, output_dir) -> None:
    """accelerate save_state pre-hook: drop the second name of each tensor stored twice in a state dict (the tiny
    model's lm_head.weight is its tied embedding). safetensors cannot store shared tensors, so accelerate would
    drop the same names itself, with a warning at every checkpoint; the file is identical either way, and loading
    (safetensors' load_model) re-ties them."""
    from accelerate.utils import id_tensor_storage

    for state in weights:
        seen = set()
        for name in list(state):
            t = state[name]
            if isinstance(t, torch.Tensor):
                key = id_tensor_storage(t)  # what accelerate groups by
                if key in seen:
                    del state[name]
                seen.add(key)


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0 = all); drop older ones and leftover temporary dirs."""
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return
    for d in os.listdir(ck):
        if d.startswith(".tmp_") or d.endswith(".old"):
            shutil.rmtree(os.path.join(ck, d), ignore_errors=True)
    if keep > 0:
        good = [p for _, p in _checkpoints(run_dir) if checkpoint_problem(p) is None]
        for p in good[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def rollout_seeds(seed: int, step: int, rank: int, world: int) -> tuple[int, int]:
    """(sampling seed, data seed) of a step's rollout on one process: functions of (seed, step, rank) only, so a
    resumed run replays exactly; the data seed is distinct for every (step, rank), so processes see different
    problems."""
    return seed * 1_000_003 + step * 1009 + rank, seed * 7_919 + step * world + rank


def training_rows(samples, repairs, credit, pad_id, device):
    """The rows the loss sees: the N samples, then the R repairs of credit.repair_rows (in that order, each in
    its sample's prompt), packed (N + R, P + C); their advantages and gates (N + R, C) (gates may be None)."""
    prompts = samples.prompts + [samples.prompts[repairs[j].sample] for j in credit.repair_rows]
    completions = samples.completions + [repairs[j].ids for j in credit.repair_rows]
    images = None  # VLM rows: a repair is trained in its sample's prompt, so with its sample's image
    if samples.images is not None:
        images = samples.images + [samples.images[repairs[j].sample] for j in credit.repair_rows]
    batch = pack(prompts, completions, pad_id, device, images=images)
    adv = credit.advantages[:, : batch.C].to(device)
    gates = credit.gates[:, : batch.C].to(device) if credit.gates is not None else None
    return batch, adv, gates


def reset_logs(run_dir: str, start: int, history: list[dict]) -> None:
    """metrics.jsonl rewritten to `history`, samples.jsonl cut after step `start` (deleted for a fresh run), so
    that a resumed run's files equal an uninterrupted run's even when the interrupted one logged steps past its
    last checkpoint."""
    write_jsonl(os.path.join(run_dir, "metrics.jsonl"), history)  # atomically (temporary file, then rename)
    path = os.path.join(run_dir, "samples.jsonl")
    kept = [row for row in read_jsonl(path) if row["step"] <= start]  # a torn last line is dropped
    if kept:
        write_jsonl(path, kept)
    elif os.path.exists(path):
        os.remove(path)


def update(acc, model, opt, sched, batch, adv, gates, old_lp, ref_lp, settings, cfg, step=0) -> tuple[dict, float]:
    """cfg.optim.ppo_epochs optimizer steps on one step's training rows.

    Each epoch runs forward and backward over micro-batches of cfg.optim.micro_batch_size rows (0 = all), each
    loss scaled by its share of the normaliser of the whole batch over all processes (see loss.py): the
    accumulated gradient is the gradient of the loss over the full batch, however it is split. Every epoch's
    ratio is against `old_lp`, the sampling policy's log-probs; old_lp None (one epoch: the first epoch's policy
    is the sampling policy) is the op's on-policy ratio, exactly 1, with the same gradient.

    Shapes: batch N rows of C completion columns; adv, gates, old_lp, ref_lp (N, C) (gates, old_lp, ref_lp may be
    None).
    A non-finite loss or gradient norm (on any process) skips the optimizer and scheduler step: the gradient is
    dropped, weights and optimizer state are untouched, and the remaining epochs are not run (earlier epochs'
    updates stay). The stats then hold step_skipped = 1.

    Returns the op's statistics over the whole step and the last epoch's gradient norm (before clipping). The
    statistics are the same on every process: each mean (clip fractions, ratio, KL, entropy) is weighted by the
    tokens it was taken over (under loss.compact the active ones, the entropy's every valid token with
    loss.whole_batch_entropy), across micro-batches, epochs and processes (not a mean of per-micro-batch means),
    and num_tokens is the total over the micro-batches and processes of one epoch (the training rows' tokens),
    so micro-batching changes none of them.
    """
    agg, world = settings["agg"], acc.num_processes
    mb = cfg.optim.micro_batch_size or len(batch)
    chunks = [slice(s, s + mb) for s in range(0, len(batch), mb)]
    total = acc.reduce(normaliser(batch, agg), "sum")  # across processes
    # token-weighted sums of the op's means, and the tokens they cover, summed over micro-batches and epochs: the op's
    # num_tokens (the active ones under loss.compact), every valid token for entropy_mean with whole_batch_entropy
    weighted, tokens, epochs_run = {}, torch.zeros((), device=acc.device), 0
    active, entropy_tokens = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    grad_norm, skipped = torch.tensor(0.0), False
    model.train()
    for _ in range(cfg.optim.ppo_epochs):
        epochs_run += 1
        bad = torch.zeros((), device=acc.device)
        for k, sl in enumerate(chunks):
            part = batch.rows(sl)
            # DDP all-reduces the gradients once, on the last micro-batch
            sync = contextlib.nullcontext() if k == len(chunks) - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                loss, stats = policy_loss(
                    model,
                    part,
                    adv[sl],
                    None if gates is None else gates[sl],
                    None if old_lp is None else old_lp[sl],
                    None if ref_lp is None else ref_lp[sl],
                    settings,
                    fused=cfg.loss.fused,
                    scale=normaliser(part, agg) * world / total,
                )
                acc.backward(loss)
            bad += (~torch.isfinite(loss.detach())).float().sum()
            n = stats["num_tokens"].detach().float().to(acc.device)  # the tokens the op's means are over
            n_valid = part.valid.sum().float().to(acc.device)  # every valid token (n without compaction)
            n_entropy = n_valid if settings.get("whole_batch_entropy") else n  # entropy_mean's tokens
            tokens += n_valid
            active += n
            entropy_tokens += n_entropy
            for key, v in stats.items():
                if key != "num_tokens":
                    w = n_entropy if key == "entropy_mean" else n
                    weighted[key] = weighted.get(key, 0.0) + v.detach().float().mean().to(acc.device) * w
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        bad += 0.0 if math.isfinite(float(grad_norm)) else 1.0
        if float(acc.reduce(bad, "sum")) > 0:  # every process agrees: the gradient norm is already all-reduced
            opt.zero_grad(set_to_none=True)
            skipped = True
            break
        opt.step()
        _kill_point("update", step)
        sched.step()
        opt.zero_grad(set_to_none=True)
    keys = sorted(weighted)
    sums = acc.reduce(torch.stack([*(weighted[k] for k in keys), active, entropy_tokens, tokens]).double(), "sum")
    out = {k: float(sums[i] / sums[-2 if k == "entropy_mean" else -3].clamp(min=1.0)) for i, k in enumerate(keys)}
    out["num_tokens"] = float(sums[-1]) / max(epochs_run, 1)
    out["step_skipped"] = float(skipped)
    return out, float(grad_norm)


def log_metrics(acc, step, local, history, path, *, grad_norm, generated_tokens, **extra) -> dict:
    """One step's row of metrics.jsonl: this process's `local` metrics averaged over the processes, the step's
    gradient norm and its variance over the last 10 steps, the generated tokens so far, the process count, then
    `extra` (the same on every process). Appended to `history` and, on the main process, to `path` and the
    trackers.

    The plain mean over processes is right for means over the same number of samples on every process (reward,
    accuracy, completion_len) and exact for values already the same on every process: update()'s statistics,
    token-weighted over all processes, with num_tokens their total. In float64, so counts stay exact."""
    keys = sorted(local)
    vec = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=acc.device)
    m = dict(zip(keys, acc.reduce(vec, "mean").tolist(), strict=True))
    recent = [g for g in [h["grad_norm"] for h in history[-9:]] + [grad_norm] if math.isfinite(g)]
    m.update(
        step=step,
        grad_norm=grad_norm,
        grad_norm_var=float(torch.tensor(recent).var()) if len(recent) > 1 else 0.0,
        generated_tokens=generated_tokens,
        processes=acc.num_processes,
        **extra,
    )
    history.append(m)
    if acc.is_main_process:
        if os.environ.get("CREDIT_OPS_TEST_KILL_AT") == f"metrics:{step}":  # test only: a torn last line
            with open(path, "a") as f:
                f.write(json.dumps(m)[:20])
            _kill_point("metrics", step)
        append_jsonl(path, m)
        acc.log({k: v for k, v in m.items() if k != "step"}, step=step)
    return m


def existing_run_problem(cfg) -> str | None:
    """Why this run may not start in cfg.run_dir: without resume, a directory that already holds files is an
    earlier run, which a new one would mix into (its metrics, checkpoints, report) or destroy."""
    if cfg.resume or cfg.overwrite or not os.path.isdir(cfg.run_dir) or not os.listdir(cfg.run_dir):
        return None
    return (
        f"run directory {cfg.run_dir} already holds a run; continue it with resume=auto, replace it with "
        f"overwrite=true (its files are deleted), or choose another name= / out_dir="
    )


def train(cfg) -> dict:
    """Train for cfg.steps steps (fewer with cfg.token_budget or cfg.stop_after) and return the summary.

    setup      Accelerator, task, verifier, model (warm-started), reference model, optimizer, reviser
    resume     the latest (or the given) checkpoint; metrics.jsonl and samples.jsonl rewritten up to it
    each step  rollout -> rewards -> repairs -> credit -> old log-probs -> update -> metrics -> checkpoint
    the end    checkpoint, held-out accuracy, summary.json, report.html
    """
    # every process looks before any writes: the Accelerator's start is a rendezvous of all of them
    if why := existing_run_problem(cfg):
        raise ConfigError(why)
    on_gpu = torch.cuda.is_available()
    if cfg.threads > 0 or not (on_gpu or cfg.model.path):
        torch.set_num_threads(cfg.threads or 1)
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    # cpu=True without a GPU: `accelerate launch --num_processes N` then runs DDP over gloo (MULTI_CPU)
    acc = Accelerator(cpu=not on_gpu, mixed_precision=mp, log_with=_trackers() or None, project_dir=cfg.run_dir)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    main = acc.is_main_process
    log = acc.print
    if main and (why := process_count_problem(world)):  # e.g. `accelerate launch --num_processes 2` on a CPU
        warnings.warn(why, stacklevel=1)
    if main and cfg.overwrite and not cfg.resume:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    os.makedirs(cfg.run_dir, exist_ok=True)

    task = build_visual_task(cfg) if cfg.task.name in VISUAL_TASKS else build_task(cfg)
    verifier = Verifier(cfg.task.verifier, task, cfg.task.verify_timeout)
    with acc.main_process_first():  # the warm start is cached: the main process pays, the others load it
        model, tok = build_model(cfg, task, log)
    ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False) if cfg.loss.beta > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warm = max(1, cfg.optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model, opt, sched = acc.prepare(model, opt, sched)
    acc.register_save_state_pre_hook(drop_tied_duplicates)
    policy = lambda: acc.unwrap_model(model)  # generation runs on the unwrapped module

    def full_params():
        """Generation needs whole weights: under FSDP gather them for the rollout (no-op otherwise)."""
        if acc.distributed_type == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.summon_full_params(model, writeback=False, recurse=True)
        return contextlib.nullcontext()

    reviser = build_reviser(cfg, task, tok, verifier, policy, device) if cfg.uses_repairs else None
    settings = loss_settings(cfg)
    delimiter = credit_mod.delimiter_ids(tok, task.delimiter)  # step ends, for step-level masks
    if main:
        acc.init_trackers("credit-ops", config={k: str(v) for k, v in to_dict(cfg).items()})
        # the resolved configuration; config.yaml reads back with `credit-train --config RUN_DIR/config.yaml`
        write_atomic(os.path.join(cfg.run_dir, "config.json"), json.dumps(to_dict(cfg), indent=1))
        write_atomic(os.path.join(cfg.run_dir, "config.yaml"), to_yaml(cfg))

    # ---- resume
    # the held-out evaluation before RL, the RL time so far and the steps resumed at travel in every checkpoint,
    # so that a resumed run's summary covers the whole run
    start, generated, history, initial, elapsed, resumed_at = 0, 0, [], {}, 0.0, []
    ckpt = _latest_checkpoint(cfg.run_dir) if cfg.resume == "auto" else (cfg.resume or None)
    if ckpt and cfg.resume != "auto" and (why := checkpoint_problem(ckpt)):
        raise RuntimeError(f"resume: checkpoint {ckpt} cannot be loaded: {why}")
    if ckpt:
        acc.load_state(ckpt)
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        start, generated, history = state["step"], state["generated_tokens"], state["history"]
        initial, elapsed = state.get("initial", {}), state.get("elapsed", 0.0)
        resumed_at = [*state.get("resumed_at", []), start]
        log(f"resumed from {ckpt} at step {start}")
    elif cfg.resume == "auto":
        log(f"resume=auto: no complete checkpoint in {cfg.run_dir}; starting from scratch")
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    samples_path = os.path.join(cfg.run_dir, "samples.jsonl")
    if main:
        reset_logs(cfg.run_dir, start, history)

    def save(step):
        """Atomically: written to checkpoints/.tmp_step_N, sealed with trainer_state.json, renamed to step_N;
        then only the newest cfg.keep_checkpoints are kept."""
        ck = os.path.join(cfg.run_dir, "checkpoints")
        tmp, path = os.path.join(ck, f".tmp_step_{step}"), os.path.join(ck, f"step_{step}")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        _kill_point("checkpoint", step)
        if main:
            run = dict(initial=initial, elapsed=elapsed + time.time() - t0, resumed_at=resumed_at)
            finish_checkpoint(tmp, path, {"step": step, "generated_tokens": generated, "history": history, **run})
            prune_checkpoints(cfg.run_dir, cfg.keep_checkpoints)
        acc.wait_for_everyone()

    # consecutive skipped (non-finite) steps so far, carried over a resume through the history
    consecutive = 0
    for h in reversed(history):
        if not h.get("step_skipped"):
            break
        consecutive += 1

    if start == 0:  # the warm-started policy on held-out prompts, for the summary (every rank: FSDP gathers)
        policy().eval()
        with full_params(), acc.autocast():
            initial = evaluate(policy(), tok, task, verifier, cfg, device, samples_per_prompt=4)
        log(
            f"held-out accuracy before RL: greedy {initial['eval_accuracy']:.3f}, "
            f"sampled {initial['eval_sampled_accuracy']:.3f}"
        )
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.algo}", unit="step", dynamic_ncols=True)
    t0 = time.time()
    done = start  # steps completed
    for step in range(start, cfg.steps):
        if cfg.token_budget and generated >= cfg.token_budget:
            break
        # -- rollout: data and sampling randomness are functions of (seed, step, rank)
        sampling_seed, data_seed = rollout_seeds(cfg.seed, step, rank, world)
        torch.manual_seed(sampling_seed)
        problems = task.sample(cfg.rollout.prompts_per_step, torch.Generator().manual_seed(data_seed), split="train")
        policy().eval()
        with full_params(), acc.autocast():
            samples = rollout(policy(), tok, problems, cfg, device)
            _kill_point("rollout", step + 1)
            per_sample = [problems[g] for g in samples.group_ids.tolist()]
            errors_before = verifier.errors
            rewards = verifier.batch(per_sample, samples.texts)  # N floats
            n_gen = samples.n_generated

            # -- revise: repairs of the wrong samples (credit methods only), verified; IOP shortens them
            repairs = reviser(per_sample, samples, rewards) if reviser is not None else []
            _kill_point("revise", step + 1)
            n_gen += sum(r.n_generated for r in repairs)
            if repairs and cfg.revise.verified_truncation:
                n_gen += verified_truncation(policy(), tok, per_sample, samples, repairs, verifier, cfg, device)

        # -- credit: advantages and gates for the samples and the repair rows that join the loss
        credit = credit_mod.assign(cfg, samples, rewards, repairs, device, delimiter)
        batch, adv, gates = training_rows(samples, repairs, credit, tok.pad_token_id, device)

        # -- old-policy log-probs: the sampling model's, in the training forward's precision (the first ratio
        # is exactly 1); the wrapped module, so FSDP shards stay sharded. (N + R, C) each. With one PPO epoch the
        # old policy is the one being trained, unchanged until the update: its forward would repeat the training
        # forward's, so it is skipped and the op takes old_logprobs=None (ratio 1, the same loss and gradient).
        # With the fused head and compaction (loss.compact) they cover only the tokens the loss reads.
        with acc.autocast():
            lp = dict(temperature=cfg.rollout.temperature, micro_batch=cfg.optim.micro_batch_size)
            select = loss_tokens(batch, adv, gates, settings) if cfg.loss.fused else None
            logprobs = sequence_logprobs if select is None else functools.partial(head_logprobs, select=select)
            old_lp = logprobs(model, batch, **lp) if cfg.optim.ppo_epochs > 1 else None
            ref_lp = logprobs(ref_model, batch, **lp) if ref_model else None

        # -- update: ppo_epochs optimizer steps, micro-batches accumulated over the whole batch
        stats, grad_norm = update(acc, model, opt, sched, batch, adv, gates, old_lp, ref_lp, settings, cfg, step + 1)
        if stats["step_skipped"]:
            consecutive += 1
            warnings.warn(
                f"step {step + 1}: non-finite loss or gradient (grad_norm={grad_norm}); step skipped, weights and "
                f"optimizer state unchanged ({consecutive} in a row)",
                stacklevel=1,
            )
        else:
            consecutive = 0

        # -- metrics (means over processes), held-out accuracy, a sample group for the report
        valid = batch.valid[: len(samples.texts)]
        local = {
            "reward": sum(rewards) / len(rewards),
            "accuracy": sum(map(is_correct, rewards)) / len(rewards),
            # the policy's mean token entropy over the training rows (samples and repairs), from the update's
            # forward (the op's statistic; with one epoch the sampling policy's)
            "entropy": stats["entropy_mean"],
            "completion_len": float(valid.sum(-1).float().mean()),
            "verifier_errors": verifier.errors - errors_before,  # scorer faults this step (scored 0)
            **credit.metrics,
            **stats,
        }
        generated += int(acc.reduce(torch.tensor(n_gen, device=device), "sum"))
        skipped_total = sum(int(h.get("step_skipped", 0)) for h in history) + int(stats["step_skipped"])
        extra = dict(lr=sched.get_last_lr()[0], skipped_steps=skipped_total, time=elapsed + time.time() - t0)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step == 0):
            policy().eval()
            with full_params(), acc.autocast():
                extra["eval_accuracy"] = evaluate(policy(), tok, task, verifier, cfg, device)["eval_accuracy"]
        m = log_metrics(
            acc, step + 1, local, history, metrics_path, grad_norm=grad_norm, generated_tokens=generated, **extra
        )
        if main and cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == cfg.steps - 1):
            view = credit_mod.sample_view(step + 1, tok, samples, rewards, repairs, credit, per_sample)
            append_jsonl(samples_path, view)

        # -- checkpoint
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", tok=generated)
        if cfg.save_every and done % cfg.save_every == 0:
            save(done)
        if cfg.max_skipped_steps and consecutive >= cfg.max_skipped_steps:
            if not (cfg.save_every and done % cfg.save_every == 0):
                save(done)
            if bar is not None:
                bar.close()
            acc.end_training()
            raise NonFiniteError(
                f"stopping after {consecutive} consecutive steps with a non-finite loss or gradient (steps "
                f"{done - consecutive + 1}..{done}; max_skipped_steps={cfg.max_skipped_steps}); the weights are the "
                f"last good step's, saved in {os.path.join(cfg.run_dir, 'checkpoints', f'step_{done}')}"
            )
        if cfg.stop_after and done - start >= cfg.stop_after:
            break
    if bar is not None:
        bar.close()
    if not (cfg.save_every and done % cfg.save_every == 0):
        save(done)
    # time: the RL steps' wall time over every session of the run (the initial and final evaluations excluded)
    summary = {"steps": done, "generated_tokens": generated, "time": elapsed + time.time() - t0}
    if resumed_at:
        summary["resumed_at"] = resumed_at
    if history:
        summary.update({k: v for k, v in history[-1].items() if isinstance(v, float) and k != "time"})
    summary.update({f"initial_{k}": v for k, v in initial.items()})
    policy().eval()
    with full_params(), acc.autocast():  # every rank: under FSDP gathering the weights is collective
        summary.update(evaluate(policy(), tok, task, verifier, cfg, device, samples_per_prompt=4))
    if main:
        write_atomic(os.path.join(cfg.run_dir, "summary.json"), json.dumps(summary, indent=1))
        if cfg.report:
            from .report import write_report

            write_report(cfg.run_dir)
            log(f"report: {os.path.join(cfg.run_dir, 'report.html')}")
    acc.end_training()
    return summary
