"""`make experiment`: GRPO vs IBPO vs Difference Feedback (token and step) on the built-in task, several
seeds each, at matched compute (the same budget of generated tokens, revisions included).

    python -m credit_ops.trainer.experiment [seeds=3] [budget=150000] [workers=2] [key=value ...]

Every run starts from the same warm-started model (the seeds vary the RL randomness) and uses the same loss
(GRPO's clipped surrogate, seq_mean_token_mean): only the credit assignment differs. Reported per method
(mean ± std over seeds): final accuracy (sampled at T=1 on held-out prompts, and greedy), tokens and steps to a
target accuracy (10-step moving average of the training accuracy), and the gradient-norm variance across steps.
Writes runs/experiment/{results.json, results.md, experiment.png}; extra key=value pairs go to every run.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .config import ConfigError, load_config

METHODS = {
    "GRPO": ["algo=grpo"],
    "IBPO": ["algo=ibpo"],
    "DiffFeedback-token": ["algo=diff_feedback", "credit.granularity=token"],
    "DiffFeedback-step": ["algo=diff_feedback", "credit.granularity=step"],
}
COMMON = ["loss.loss_type=grpo", "warm_start.seed=0", "steps=100000", "progress=false", "report=false", "threads=1"]


class RunFailed(RuntimeError):
    pass


def _run(name, args, out_dir, log_dir):
    cmd = [sys.executable, "-m", "credit_ops.trainer", f"name={name}", f"out_dir={out_dir}", *args]
    path = os.path.join(log_dir, f"{name}.log")
    with open(path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        with open(path) as log:
            last = ([line.strip() for line in log if line.strip()] or ["(no output)"])[-1]
        raise RunFailed(f"run {name} failed (exit {proc.returncode}): {last}; see {path}")
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out_dir, name, "summary.json")) as f:
        return rows, json.load(f)


def _moving(xs, w=10):
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def _curve(rows):
    """(generated tokens, 10-step moving average of the training accuracy), one pair per step."""
    return list(zip([r["generated_tokens"] for r in rows], _moving([r["accuracy"] for r in rows]), strict=True))


def _first_reaching(rows, target):
    acc = _moving([r["accuracy"] for r in rows])
    for r, a in zip(rows, acc, strict=True):
        if a >= target:
            return r["step"], r["generated_tokens"]
    return None, None


def _ms(xs, fmt="{:.3f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "not reached"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return (fmt + " ± " + fmt).format(statistics.mean(xs), sd)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        opts, extra = _options(argv)
        # the trainer's own check of the extra keys, before any run starts
        load_config([*COMMON, *extra])
    except ConfigError as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    try:
        return _experiment(opts, extra)
    except RunFailed as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 1


def _options(argv):
    """The experiment's own options (seeds, budget, workers, target, out) and the key=value pairs for every run."""
    opts = {"seeds": 3, "budget": 150_000, "workers": 2, "target": 0.45, "out": "runs/experiment"}
    extra = []
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            extra.append(a)
            continue
        try:
            opts[k] = type(opts[k])(v)
        except ValueError:
            raise ConfigError(f"{k} must be {type(opts[k]).__name__}, got {v!r}") from None
        if k in ("seeds", "budget", "workers") and opts[k] < 1:
            raise ConfigError(f"{k} must be >= 1, got {v!r}")
    return opts, extra


def _experiment(opts, extra):
    out = opts["out"]
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    t0 = time.time()
    seeds = list(range(opts["seeds"]))
    base = [*COMMON, f"token_budget={opts['budget']}", *extra]
    with ThreadPoolExecutor(opts["workers"]) as pool:
        # the warm start first (cached): every method and seed starts from the same model and pays nothing for it
        _run("warm", [*base, "steps=1"], out, log_dir)
        jobs = {
            (m, s): pool.submit(_run, f"{m}_s{s}", [*base, *a, f"seed={s}"], out, log_dir)
            for m, a in METHODS.items()
            for s in seeds
        }
        results = {k: f.result() for k, f in jobs.items()}

    table, curves = {}, {}
    for m in METHODS:
        runs = [results[(m, s)] for s in seeds]
        steps_to, tokens_to = zip(*[_first_reaching(rows, opts["target"]) for rows, _ in runs], strict=True)
        table[m] = {
            "final_sampled_accuracy": [s["eval_sampled_accuracy"] for _, s in runs],
            "final_greedy_accuracy": [s["eval_accuracy"] for _, s in runs],
            "final_train_accuracy": [statistics.mean(r["accuracy"] for r in rows[-10:]) for rows, _ in runs],
            "steps": [rows[-1]["step"] for rows, _ in runs],
            "steps_to_target": list(steps_to),
            "tokens_to_target": list(tokens_to),
            "grad_norm_variance": [statistics.pvariance([r["grad_norm"] for r in rows]) for rows, _ in runs],
        }
        curves[m] = [_curve(rows) for rows, _ in runs]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"options": opts, "extra": extra, "table": table}, f, indent=1)

    lines = [
        f"Built-in arithmetic task, {len(seeds)} seeds per method, matched compute: {opts['budget']:,} generated "
        f"tokens per run (revisions included), same warm start and loss (GRPO surrogate) for every method. "
        f"Mean ± std over seeds; target = {opts['target']:.2f} training accuracy (10-step moving average).",
        "",
        "| method | final accuracy (sampled, held-out) | final accuracy (greedy) | steps in budget "
        "| steps to target | tokens to target | grad-norm variance |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, t in table.items():
        reached = sum(x is not None for x in t["steps_to_target"])
        lines.append(
            f"| {m} | {_ms(t['final_sampled_accuracy'])} | {_ms(t['final_greedy_accuracy'])} "
            f"| {_ms(t['steps'], '{:.0f}')} | {_ms(t['steps_to_target'], '{:.0f}')} ({reached}/{len(seeds)}) "
            f"| {_ms(t['tokens_to_target'], '{:,.0f}')} | {_ms(t['grad_norm_variance'], '{:.4f}')} |"
        )
    lines.append("")
    lines.append(f"Wall time {time.time() - t0:.0f} s.")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(curves, os.path.join(out, "experiment.png"), opts)
    print("\n".join(lines))
    return 0


def _plot(curves, path, opts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colors = ["#636363", "#08519c", "#d94801", "#238b45"]
    for (m, runs), c in zip(curves.items(), colors, strict=False):
        for i, run in enumerate(runs):
            xs, ys = zip(*run, strict=True)
            ax.plot(xs, ys, color=c, lw=1.5, alpha=0.8, label=m if i == 0 else None)
    ax.axhline(opts["target"], color="k", ls=":", lw=1)
    ax.set_xlabel("generated tokens (rollouts + revisions)")
    ax.set_ylabel("training accuracy (10-step mean)")
    ax.set_title("matched compute: accuracy vs generated tokens, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
