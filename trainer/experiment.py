"""`make experiment`: the credit methods against GRPO on the built-in task, several seeds each, at matched compute
(the same budget of generated tokens, rollouts and revisions included).

    python -m credit_ops.trainer.experiment [seeds=5] [budget=120000] [workers=2] [methods=GRPO,IBPO] [reviser=policy]
                                            [key=value ...]
    python -m credit_ops.trainer.experiment --render runs/experiment/results.json [--readme README.md [--table NAME]]
    make experiment-vlm    # the same on images: --config=vlm, the oracle reviser, GRPO vs Difference Feedback

Every run of a seed starts from the same warm-started model (the seed varies the RL randomness; the data of a step
is a function of the seed and the step, so the methods of one seed see the same prompts) and, except IOP, uses
the same loss (GRPO's clipped surrogate): only the credit assignment differs. The credit methods revise with the
policy itself against sibling references (the papers' mechanism; `reviser=oracle` swaps in the task oracle for
all of them); `IBPO-oracle` revises with the task oracle, an upper bound on what a reviser can give.

Reported per method: the mean over seeds and its 95% bootstrap interval of held-out greedy and sampled accuracy,
the difference to GRPO paired by seed (with its interval), steps and tokens until the training accuracy (10-step
moving average) reaches a target, the across-step variance of the gradient norm, and the active-token ratio at
the start and the end of training. Writes runs/experiment/{results.json, results.md, experiment.png}; extra
key=value pairs go to every run. An `out` folder that holds an earlier experiment's results is refused unless
`overwrite=true` (its runs are then replaced). `--render` rebuilds the table from a results file and, with
`--readme`, writes it between the README's markers of table NAME (experiment-table, or experiment-vlm-table for
the VLM experiment; tests/test_experiment.py checks the README against the committed files).
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .config import ConfigError, load_config

POLICY = ["revise.reviser=policy"]
METHODS = {
    "GRPO": ["algo=grpo"],
    "IBPO": ["algo=ibpo", "revise.n_refs=2", *POLICY],  # K = 3: two sibling references
    "IBPO-K1": ["algo=ibpo", "revise.n_refs=0", *POLICY],  # K = 1: the attempt alone, no reference
    "DF-token": ["algo=diff_feedback", "credit.granularity=token", *POLICY],
    "DF-step": ["algo=diff_feedback", "credit.granularity=step", *POLICY],
    "IOP": ["algo=iop", "loss.loss_type=gated_gspo", *POLICY],  # IOP's own loss (gated GSPO)
    "IBPO-oracle": ["algo=ibpo", "revise.reviser=oracle"],  # upper bound: a reviser that is always right
}
COMMON = [
    "loss.loss_type=grpo",
    "warm_start.seed=0",
    "steps=100000",
    "eval_prompts=256",
    "eval_every=0",
    "progress=false",
    "report=false",
    "threads=1",
]


def readme_markers(table: str = "experiment-table") -> tuple[str, str]:
    """The README's start and end markers of one rendered table (experiment-table, experiment-vlm-table)."""
    return f"<!-- {table}:start -->", f"<!-- {table}:end -->"


README_START, README_END = readme_markers()


class RunFailed(RuntimeError):
    pass


def _run(name, args, out_dir, log_dir):
    # the experiment's folder is regenerated as a whole (main() refused it if it held results, unless asked)
    cmd = [sys.executable, "-m", "credit_ops.trainer", f"name={name}", f"out_dir={out_dir}", "overwrite=true", *args]
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


def bootstrap_ci(xs, level=0.95, n=10_000, seed=0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of xs (resampled with replacement, fixed seed)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n))
    lo = means[int((1 - level) / 2 * n)]
    hi = means[min(n - 1, int((1 + level) / 2 * n))]
    return lo, hi


def summarise(runs: dict, target: float) -> dict:
    """Per method, from {method: [(metrics rows, summary) per seed, seeds in order]}: per-seed values of every
    reported quantity (lists, None where a run never reached the target)."""
    table = {}
    for m, per_seed in runs.items():
        steps_to, tokens_to = zip(*[_first_reaching(rows, target) for rows, _ in per_seed], strict=True)
        table[m] = {
            "greedy": [s["eval_accuracy"] for _, s in per_seed],
            "sampled": [s["eval_sampled_accuracy"] for _, s in per_seed],
            "initial_greedy": [s["initial_eval_accuracy"] for _, s in per_seed],
            "initial_sampled": [s["initial_eval_sampled_accuracy"] for _, s in per_seed],
            "steps": [rows[-1]["step"] for rows, _ in per_seed],
            "tokens": [rows[-1]["generated_tokens"] for rows, _ in per_seed],
            "steps_to_target": list(steps_to),
            "tokens_to_target": list(tokens_to),
            "grad_norm_variance": [statistics.pvariance([r["grad_norm"] for r in rows]) for rows, _ in per_seed],
            "active_start": [statistics.fmean(r["active_tokens"] for r in rows[:5]) for rows, _ in per_seed],
            "active_end": [statistics.fmean(r["active_tokens"] for r in rows[-5:]) for rows, _ in per_seed],
            "repair_success": [statistics.fmean(r["repair_success"] for r in rows) for rows, _ in per_seed],
        }
    return table


def _mean_ci(xs, fmt="{:.3f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    lo, hi = bootstrap_ci(xs)
    return (fmt + " [" + fmt + ", " + fmt + "]").format(statistics.fmean(xs), lo, hi)


def _paired(xs, base, fmt="{:+.3f}"):
    d = [x - b for x, b in zip(xs, base, strict=True)]
    lo, hi = bootstrap_ci(d)
    return (fmt + " [" + fmt + ", " + fmt + "]").format(statistics.fmean(d), lo, hi)


def render(results: dict) -> str:
    """The Markdown table of a results.json (its options and per-seed table): a pure function of the file."""
    o, table = results["options"], results["table"]
    n = len(next(iter(table.values()))["greedy"])
    base = table.get("GRPO")
    first = next(iter(table.values()))
    lines = [
        f"{n} seeds per method, {o['budget']:,} generated tokens per run (rollouts and revisions), held-out greedy "
        f"and sampled (T = {o['temperature']:g}, 4 per prompt) accuracy on {o['eval_prompts']} prompts disjoint from "
        f"training; start: greedy {statistics.fmean(first['initial_greedy']):.3f}, sampled "
        f"{statistics.fmean(first['initial_sampled']):.3f}. Mean [95% bootstrap interval] over seeds; Δ: paired by "
        f"seed against GRPO. Target: training accuracy {o['target']:.2f} (10-step moving average).",
        "",
        "| method | greedy | Δ greedy | sampled | Δ sampled | steps | steps to target | tokens to target "
        "| grad-norm var. | active tokens (start → end) | repair success |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, t in table.items():
        reached = sum(x is not None for x in t["steps_to_target"])
        dg = _paired(t["greedy"], base["greedy"]) if base and m != "GRPO" else "–"
        ds = _paired(t["sampled"], base["sampled"]) if base and m != "GRPO" else "–"
        lines.append(
            f"| {m} | {_mean_ci(t['greedy'])} | {dg} | {_mean_ci(t['sampled'])} | {ds} "
            f"| {statistics.fmean(t['steps']):.0f} | {_mean_ci(t['steps_to_target'], '{:.0f}')} ({reached}/{n}) "
            f"| {_mean_ci(t['tokens_to_target'], '{:,.0f}')} | {_mean_ci(t['grad_norm_variance'], '{:.4f}')} "
            f"| {statistics.fmean(t['active_start']):.2f} → {statistics.fmean(t['active_end']):.2f} "
            f"| {statistics.fmean(t['repair_success']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_readme_table(readme: str, table_md: str, table: str = "experiment-table") -> None:
    """Replace the text between the README's markers of `table` with `table_md`."""
    start, end = readme_markers(table)
    with open(readme) as f:
        text = f.read()
    if start not in text or end not in text:
        raise ConfigError(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{start}\n{table_md}{end}{tail}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--render":
        return _render_cli(argv[1:])
    try:
        opts, extra = _options(argv)
        # the trainer's own check of every run's keys, before any run starts
        for m in opts["methods"]:
            load_config([*COMMON, *method_args(m, opts), *extra])
    except ConfigError as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    try:
        return _experiment(opts, extra)
    except RunFailed as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 1


def _render_cli(argv):
    if not argv or not os.path.isfile(argv[0]):
        print(f"experiment --render: no results file {argv[0] if argv else ''!r}", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        md = render(json.load(f))
    if argv[1:2] == ["--readme"] and len(argv) > 2:
        table = argv[4] if argv[3:4] == ["--table"] and len(argv) > 4 else "experiment-table"
        try:
            write_readme_table(argv[2], md, table)
        except ConfigError as e:
            print(f"experiment --render: {e}", file=sys.stderr)
            return 2
    print(md, end="")
    return 0


def _options(argv):
    """The experiment's own options and the key=value pairs for every run."""
    opts = {
        "seeds": 5,
        "budget": 120_000,
        "workers": 2,
        "target": 0.6,
        "out": "runs/experiment",
        "methods": "",
        "reviser": "policy",
        "overwrite": False,
    }
    extra = []
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            extra.append(a)
            continue
        try:
            opts[k] = _parse(v, type(opts[k]))
        except ValueError:
            raise ConfigError(f"{k} must be {type(opts[k]).__name__}, got {v!r}") from None
        if k in ("seeds", "budget", "workers") and opts[k] < 1:
            raise ConfigError(f"{k} must be >= 1, got {v!r}")
    names = [m for m in opts["methods"].split(",") if m] or list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; expected some of {','.join(METHODS)}")
    opts["methods"] = names
    if opts["reviser"] not in ("policy", "oracle"):
        raise ConfigError(f"reviser must be policy or oracle, got {opts['reviser']!r}")
    if os.path.exists(os.path.join(opts["out"], "results.json")) and not opts["overwrite"]:
        raise ConfigError(f"{opts['out']} holds an earlier experiment; overwrite=true replaces it, or choose out=")
    return opts, extra


def _parse(v: str, kind: type):
    if kind is bool:
        if v.lower() not in ("true", "false", "1", "0"):
            raise ValueError(v)
        return v.lower() in ("true", "1")
    return kind(v)


def method_args(method: str, opts: dict) -> list[str]:
    """A method's key=value pairs, with the experiment's reviser for the self-revising methods."""
    return [f"revise.reviser={opts['reviser']}" if a in POLICY else a for a in METHODS[method]]


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
            (m, s): pool.submit(_run, f"{m}_s{s}", [*base, *method_args(m, opts), f"seed={s}"], out, log_dir)
            for m in opts["methods"]
            for s in seeds
        }
        results = {k: f.result() for k, f in jobs.items()}
    runs = {m: [results[(m, s)] for s in seeds] for m in opts["methods"]}
    table = summarise(runs, opts["target"])
    cfg = load_config(base)
    record = {
        "options": {**opts, "eval_prompts": cfg.eval_prompts, "temperature": cfg.rollout.temperature},
        "extra": extra,
        "wall_time_s": round(time.time() - t0),
        "table": table,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    md = render(record) + f"\nWall time {record['wall_time_s']} s.\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    _plot({m: [_curve(rows) for rows, _ in r] for m, r in runs.items()}, os.path.join(out, "experiment.png"), opts)
    print(md, end="")
    return 0


def _plot(curves, path, opts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    colors = ["#636363", "#08519c", "#6baed6", "#d94801", "#fd8d3c", "#238b45", "#9e9ac8"]
    for (m, runs), c in zip(curves.items(), colors, strict=False):
        for i, run in enumerate(runs):
            xs, ys = zip(*run, strict=True)
            ax.plot(xs, ys, color=c, lw=1.2, alpha=0.7, label=m if i == 0 else None)
    ax.axhline(opts["target"], color="k", ls=":", lw=1)
    ax.set_xlabel("generated tokens (rollouts + revisions)")
    ax.set_ylabel("training accuracy (10-step mean)")
    ax.set_title("matched compute: accuracy vs generated tokens, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
