"""The training loop: rollout -> verify -> revise -> credit -> policy loss, under accelerate.

One step, per process (SPEC §1):
    B problems, G samples each          rollout.rollout            N = B * G completions
    rewards                             rewards.Verifier           (N,)
    repairs of the wrong samples        revise.*                   M repairs (credit methods only)
    advantages, gates, repair rows      credit.assign              (N + R, C)
    old-policy log-probs                the sampling model         (N + R, C), no gradient
    policy update                       loss.policy_loss           micro-batches, token-normalised
The data position and the sampling RNG are functions of (seed, step, rank), so a resumed run replays exactly.
"""

import contextlib
import copy
import json
import os
import time

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import set_seed

from . import credit as credit_mod
from .config import to_dict
from .loss import loss_settings, normaliser, policy_loss
from .modeling import char_tokenizer, encode_prompt, load_pretrained, tiny_model, warm_start
from .revise import build_reviser, verified_truncation
from .rewards import Verifier
from .rollout import generate, pack, rollout, sequence_logprobs
from .tasks import build_task


def _trackers():
    try:
        import tensorboard  # noqa: F401

        return ["tensorboard"]
    except ImportError:
        return []


def build_model(cfg, task, log):
    """(model, tokenizer): a local HF model, or the embedded tiny model after its warm start."""
    if cfg.model.path:
        return load_pretrained(cfg.model.path, cfg.model.gguf_file or None)
    tok = char_tokenizer()
    set_seed(cfg.warm_start.seed if cfg.warm_start.seed >= 0 else cfg.seed)  # the initial weights
    model = tiny_model(cfg, tok)
    warm_start(model, tok, task, cfg, log=log)
    return model, tok


@torch.no_grad()
def evaluate(model, tok, task, verifier, cfg, device, samples_per_prompt: int = 0) -> dict:
    """Accuracy on a fixed held-out set of prompts (its own seed, never trained on): greedy, and, with
    samples_per_prompt > 0, sampled at the rollout temperature. Leaves the training RNG untouched."""
    probs = task.sample(cfg.eval_prompts, torch.Generator().manual_seed(10**6 + cfg.seed))
    prompts = [encode_prompt(tok, p.prompt) for p in probs]
    r = cfg.rollout
    _, texts = generate(model, tok, prompts, n=1, max_new_tokens=r.max_new_tokens, temperature=1.0,
                        do_sample=False, device=device)  # fmt: skip
    out = {"eval_accuracy": sum(verifier(p, t) >= 0.5 for p, t in zip(probs, texts, strict=True)) / len(probs)}
    if samples_per_prompt:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(10**6 + cfg.seed)
            _, texts = generate(model, tok, prompts, n=samples_per_prompt, max_new_tokens=r.max_new_tokens,
                                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, device=device)  # fmt: skip
        per = [probs[i // samples_per_prompt] for i in range(len(texts))]
        out["eval_sampled_accuracy"] = sum(verifier(p, t) >= 0.5 for p, t in zip(per, texts, strict=True)) / len(per)
    return out


def _latest_checkpoint(run_dir):
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return None
    steps = sorted(int(d.split("_")[1]) for d in os.listdir(ck) if d.startswith("step_"))
    return os.path.join(ck, f"step_{steps[-1]}") if steps else None


def train(cfg) -> dict:
    on_gpu = torch.cuda.is_available()
    if cfg.threads > 0 or not (on_gpu or cfg.model.path):
        torch.set_num_threads(cfg.threads or 1)
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    # cpu=True without a GPU: `accelerate launch --num_processes N` then runs DDP over gloo (MULTI_CPU)
    acc = Accelerator(cpu=not on_gpu, mixed_precision=mp, log_with=_trackers() or None, project_dir=cfg.run_dir)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    main = acc.is_main_process
    log = acc.print
    os.makedirs(cfg.run_dir, exist_ok=True)

    task = build_task(cfg)
    verifier = Verifier(cfg.task.verifier, task)
    with acc.main_process_first():  # the warm start is cached: the main process pays, the others load it
        model, tok = build_model(cfg, task, log)
    ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False) if cfg.loss.beta > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warm = max(1, cfg.optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model, opt, sched = acc.prepare(model, opt, sched)
    policy = lambda: acc.unwrap_model(model)  # noqa: E731  (generation runs on the unwrapped module)

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
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)

    # ---- resume
    start, generated, history = 0, 0, []
    ckpt = _latest_checkpoint(cfg.run_dir) if cfg.resume == "auto" else (cfg.resume or None)
    if ckpt:
        acc.load_state(ckpt)
        with open(os.path.join(ckpt, "trainer_state.json")) as f:
            state = json.load(f)
        start, generated, history = state["step"], state["generated_tokens"], state["history"]
        log(f"resumed from {ckpt} at step {start}")
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    samples_path = os.path.join(cfg.run_dir, "samples.jsonl")
    if main:  # rewrite the logs up to the resume point, so a resumed run's files equal an uninterrupted run's
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        if start == 0 and os.path.exists(samples_path):
            os.remove(samples_path)

    def save(step):
        path = os.path.join(cfg.run_dir, "checkpoints", f"step_{step}")
        acc.save_state(path)
        if main:
            with open(os.path.join(path, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "generated_tokens": generated, "history": history}, f)
        acc.wait_for_everyone()

    initial = {}
    if start == 0:  # the warm-started policy on held-out prompts, for the summary (every rank: FSDP gathers)
        policy().eval()
        with full_params(), acc.autocast():
            initial = evaluate(policy(), tok, task, verifier, cfg, device, samples_per_prompt=4)
        log(f"held-out accuracy before RL: greedy {initial['eval_accuracy']:.3f}, "
            f"sampled {initial['eval_sampled_accuracy']:.3f}")  # fmt: skip
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
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step * world + rank)
        problems = task.sample(cfg.rollout.prompts_per_step, gen)
        policy().eval()
        with full_params(), acc.autocast():
            samples = rollout(policy(), tok, problems, cfg, device)
            per_sample = [problems[g] for g in samples.group_ids.tolist()]
            rewards = verifier.batch(per_sample, samples.texts)  # N floats
            n_gen = samples.n_generated

            # -- revise: repairs of the wrong samples (credit methods only)
            repairs = []
            if reviser is not None:
                repairs = reviser(per_sample, samples, rewards)
                n_gen += sum(r.n_generated for r in repairs)
                if cfg.revise.verified_truncation:
                    good = [r for r in repairs if r.reward >= 0.5]
                    n_gen += verified_truncation(policy(), tok, per_sample, samples, good, verifier, cfg, device)

        # -- credit: advantages and gates for the samples and the repair rows that join the loss
        credit = credit_mod.assign(cfg, samples, rewards, repairs, device, delimiter)
        rows_prompt = samples.prompts + [samples.prompts[repairs[j].sample] for j in credit.repair_rows]
        rows_comp = samples.completions + [repairs[j].ids for j in credit.repair_rows]
        batch = pack(rows_prompt, rows_comp, tok.pad_token_id, device)  # (N + R, P + C)
        adv = credit.advantages[:, : batch.C].to(device)  # (N + R, C)
        gates = credit.gates[:, : batch.C].to(device) if credit.gates is not None else None
        mb = cfg.optim.micro_batch_size or len(batch)
        with acc.autocast():  # the training forward's precision, so the first ratio is exactly 1
            T = cfg.rollout.temperature
            # (N + R, C) each: the sampling model's log-probs (the wrapped module: FSDP shards stay sharded)
            old_lp, entropy = sequence_logprobs(model, batch, temperature=T, micro_batch=mb, entropy=True)
            ref_lp = sequence_logprobs(ref_model, batch, temperature=T, micro_batch=mb) if ref_model else None

        # -- update: ppo_epochs passes over micro-batches, normalised over the accumulated batch
        model.train()
        chunks = [slice(s, s + mb) for s in range(0, len(batch), mb)]
        total = acc.reduce(normaliser(batch, settings["agg"]), "sum")  # across processes
        stats_acc, grad_norm = {}, torch.tensor(0.0)
        for _ in range(cfg.optim.ppo_epochs):
            for k, sl in enumerate(chunks):
                part = batch.rows(sl)
                scale = normaliser(part, settings["agg"]) * world / total
                ctx = acc.no_sync(model) if k < len(chunks) - 1 else _null()
                with ctx, acc.autocast():
                    loss, stats = policy_loss(
                        model,
                        part,
                        adv[sl],
                        None if gates is None else gates[sl],
                        old_lp[sl],
                        None if ref_lp is None else ref_lp[sl],
                        settings,
                        fused=cfg.loss.fused,
                        scale=scale,
                    )
                    acc.backward(loss)
                for key, v in stats.items():
                    stats_acc.setdefault(key, []).append(float(v.float().mean()))
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        # -- metrics (means over processes)
        valid = batch.valid[: len(samples.texts)]
        local = {
            "reward": sum(rewards) / len(rewards),
            "accuracy": sum(r >= 0.5 for r in rewards) / len(rewards),
            "entropy": float((entropy[: len(rewards)] * valid).sum() / valid.sum()),
            "completion_len": float(valid.sum(-1).float().mean()),
            **credit.metrics,
            **{k: sum(v) / len(v) for k, v in stats_acc.items()},
        }
        keys = sorted(local)
        vec = acc.reduce(torch.tensor([float(local[k]) for k in keys], device=device), "mean")
        m = dict(zip(keys, vec.tolist(), strict=False))
        generated += int(acc.reduce(torch.tensor(n_gen, device=device), "sum"))
        gn = float(grad_norm)
        recent = [h["grad_norm"] for h in history[-9:]] + [gn]
        m.update(
            step=step + 1,
            grad_norm=gn,
            grad_norm_var=float(torch.tensor(recent).var()) if len(recent) > 1 else 0.0,
            generated_tokens=generated,
            processes=world,
            lr=sched.get_last_lr()[0],
            time=time.time() - t0,
        )
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step == 0):
            policy().eval()
            with full_params(), acc.autocast():
                m["eval_accuracy"] = evaluate(policy(), tok, task, verifier, cfg, device)["eval_accuracy"]
        history.append(m)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            acc.log({k: v for k, v in m.items() if k != "step"}, step=step + 1)
            if cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == cfg.steps - 1):
                with open(samples_path, "a") as f:
                    f.write(
                        json.dumps(credit_mod.sample_view(step + 1, tok, samples, rewards, repairs, credit, per_sample))
                        + "\n"
                    )
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", tok=generated)
        if cfg.save_every and done % cfg.save_every == 0:
            save(done)
        if cfg.stop_after and done - start >= cfg.stop_after:
            break
    if bar is not None:
        bar.close()
    if not (cfg.save_every and done % cfg.save_every == 0):
        save(done)
    summary = {"steps": done, "generated_tokens": generated, "time": time.time() - t0}
    if history:
        summary.update({k: v for k, v in history[-1].items() if isinstance(v, float)})
    summary.update({f"initial_{k}": v for k, v in initial.items()})
    policy().eval()
    with full_params(), acc.autocast():  # every rank: under FSDP gathering the weights is collective
        summary.update(evaluate(policy(), tok, task, verifier, cfg, device, samples_per_prompt=4))
    if main:
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if cfg.report:
            from .report import write_report

            write_report(cfg.run_dir)
            log(f"report: {os.path.join(cfg.run_dir, 'report.html')}")
    acc.end_training()
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
