"""Plots and report.html from a run directory (metrics.jsonl, samples.jsonl, summary.json, config.json).

    python -m credit_ops.trainer.report runs/default

PNG per curve (reward, accuracy, repair success, active-token ratio, both entropies, gradient norm and its
across-step variance) and one self-contained HTML page rendered from templates/report.html.j2: the held-out
evaluation before and after RL, the training metrics at the start and the end, the curves inline, a legend line
for every metric, then token-credit views of sample groups (a failed trajectory, its repair, the edit mask and
the per-token advantages, coloured token by token). A resumed run is one run: metrics.jsonl is rewritten to the
checkpoint on resume and summary.json keeps the initial evaluation and the time of every session.
"""

import base64
import json
import os
import sys

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

# Every metric of metrics.jsonl: (title, legend line). "Per step" values are of the step's training batch (the
# N = prompts_per_step x group_size samples of every process); token means are weighted by tokens over
# micro-batches and processes.
METRICS = {
    "reward": ("reward (mean)", "mean reward R of the step's sampled completions"),
    "accuracy": ("accuracy (sampled)", "share of the step's sampled completions that are correct (R >= 0.5)"),
    "eval_accuracy": (
        "held-out accuracy (greedy)",
        "greedy accuracy on the fixed held-out prompts, every eval_every steps and at step 1",
    ),
    "repair_success": (
        "repair success rate",
        "wrong samples with an accepted repair / wrong samples with an attempted one",
    ),
    "repair_verified": ("repair verification rate", "verified repairs / attempted repairs"),
    "rejected_repairs": ("rejected repairs", "verified repairs rejected for an edit ratio over credit.max_edit_ratio"),
    "edit_distance": ("mean edit distance", "mean token edit distance of the chosen repairs to their samples"),
    "active_tokens": (
        "active-token ratio",
        "share of the samples' completion tokens that carry credit (gates / edit masks; 1 for sequence credit)",
    ),
    "phi": ("IBPO shaping phi", "mean phi over the wrong samples (IBPO's revision bonus, before lambda)"),
    "repair_rows": ("repair rows", "repairs trained on as extra rows of the loss (mean per process)"),
    "truncated_repairs": (
        "truncated repairs",
        "repairs credited on their verified first K edit regions only (IOP's verified truncation; mean per process)",
    ),
    "eval_sampled_accuracy": (
        "held-out accuracy (sampled)",
        "accuracy on the held-out prompts sampled at the rollout temperature, 4 per prompt (summary only)",
    ),
    "eval_shuffled_accuracy": (
        "held-out accuracy (images shuffled)",
        "greedy accuracy with each prompt given another prompt's image: a VLM that reads the image falls here",
    ),
    "entropy": (
        "policy entropy (nats/token)",
        "mean token entropy of the policy over the training rows (samples and repair rows), token-weighted over "
        "micro-batches, PPO epochs and processes: the loss's entropy_mean under its earlier name (with one epoch, "
        "the sampling policy's entropy; over the active tokens only with loss.whole_batch_entropy=false)",
    ),
    "entropy_mean": ("loss entropy (nats/token)", "the loss statistic that entropy repeats (the same number)"),
    "completion_len": ("completion length", "mean tokens per sampled completion"),
    "verifier_errors": ("verifier errors", "completions whose scorer raised or returned no reward in [0, 1]: scored 0"),
    "clip_frac": ("clip fraction", "share of active loss tokens (loss.compact) whose ratio was clipped (low or high)"),
    "clip_frac_low": ("clip fraction (low)", "share of active loss tokens clipped below 1 - eps_low with A < 0"),
    "clip_frac_high": ("clip fraction (high)", "share of active loss tokens clipped above 1 + eps_high with A > 0"),
    "ratio_mean": ("mean ratio", "mean importance ratio pi / pi_old over the active loss tokens (see loss.compact)"),
    "kl_mean": ("mean KL", "mean KL estimate to the reference model over the active loss tokens (0 if loss.beta = 0)"),
    "num_tokens": (
        "loss tokens",
        "tokens the loss was taken over in one epoch, summed over micro-batches and processes",
    ),
    "step_skipped": ("step skipped", "1 when the step's loss or gradient was non-finite and no update was made"),
    "skipped_steps": ("skipped steps", "steps skipped so far"),
    "grad_norm": ("gradient norm", "total gradient norm before clipping (the last PPO epoch's)"),
    "grad_norm_var": ("gradient-norm variance (last 10 steps)", "variance of grad_norm over the last 10 steps"),
    "generated_tokens": ("generated tokens", "tokens generated so far, rollouts and revisions, all processes"),
    "lr": ("learning rate", "the learning rate after the step"),
    "time": ("time (s)", "wall time of the RL steps so far, every session of a resumed run included"),
    "processes": ("processes", "processes the step ran on"),
}
PLOTS = [
    (k, METRICS[k][0]) for k in ("reward", "accuracy", "repair_success", "active_tokens", "entropy", "grad_norm")
] + [("grad_norm_var", METRICS["grad_norm_var"][0])]
# The held-out evaluation of summary.json, before (initial_<key>) and after RL (<key>).
EVALS = {
    "eval_accuracy": "greedy",
    "eval_sampled_accuracy": "sampled at the rollout temperature (4 per prompt)",
    "eval_shuffled_accuracy": "greedy, each prompt with another prompt's image (must fall for a VLM that reads it)",
}
# The training metrics of the summary table, first steps vs last steps.
TABLE = ["reward", "accuracy", "repair_success", "active_tokens", "entropy", "grad_norm", "num_tokens"]


def read_jsonl(path):
    """The rows of a JSONL log. A torn last line (the process was killed while writing it) is dropped with a
    warning; an unparseable line elsewhere is an error naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                import warnings

                warnings.warn(f"{path}:{i + 1}: dropping a torn last line", stacklevel=2)
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
    return rows


def append_jsonl(path, row) -> None:
    """Append one whole line and make it durable (flush + fsync), so a kill leaves at most one torn last line."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path, rows) -> None:
    """Replace a JSONL file atomically: a temporary file, fsynced, then renamed over it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path, text: str) -> None:
    """Replace a text file atomically: a temporary file, fsynced, then renamed over it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def smooth(ys, w):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _step_axis(ax) -> None:
    """x axis of steps: integer ticks only (a 3-step run gets 1, 2, 3, not 1.5, 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_metrics(rows, out_dir) -> list[str]:
    """One PNG per metric (raw and a 10-step moving average). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    steps = [r["step"] for r in rows]
    for key, title in PLOTS:
        ys = [r.get(key) for r in rows]
        if not rows or any(y is None for y in ys):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, ys, color="#9ecae1", lw=1, label="per step")
        ax.plot(steps, smooth(ys, 10), color="#08519c", lw=2, label="10-step mean")
        if key == "accuracy" and any("eval_accuracy" in r for r in rows):
            ev = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
            ax.plot(*zip(*ev, strict=True), "o-", color="#d94801", lw=1.5, ms=4, label="greedy, held-out")
        ax.set_title(title)
        _step_axis(ax)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{key}.png"
        fig.savefig(os.path.join(out_dir, name))
        plt.close(fig)
        written.append(name)
    return written


def summary_figure(rows, path, keys=("accuracy", "active_tokens", "grad_norm")) -> str:
    """A one-row overview (accuracy with the held-out greedy points, active-token ratio, gradient norm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = dict(PLOTS)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), dpi=100)
    for ax, key in zip(axes, keys, strict=True):
        ys = [r[key] for r in rows]
        ax.plot(steps, ys, color="#9ecae1", lw=1)
        ax.plot(steps, smooth(ys, 10), color="#08519c", lw=2, label="training batch (10-step mean)")
        if key == "accuracy":
            ev = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
            if ev:
                ax.plot(*zip(*ev, strict=True), "o-", color="#d94801", lw=1.5, ms=4, label="greedy, held-out")
            ax.legend(fontsize=7)
        ax.set_title(titles[key])
        _step_axis(ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _color(a: float, scale: float) -> str:
    """Advantage -> background: green positive, red negative, white zero."""
    x = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    if x >= 0:
        return f"rgba(35,139,69,{0.15 + 0.7 * x:.2f})" if x > 0 else "transparent"
    return f"rgba(203,24,29,{0.15 + 0.7 * -x:.2f})"


def _tokens(tokens, advs, mask=None) -> list[dict]:
    """One completion's tokens for the template: text, background by advantage, underline where edited."""
    scale = max([abs(a) for a in advs] + [1e-6])
    out = []
    for t, (tok, a) in enumerate(zip(tokens, advs, strict=False)):
        edited = mask is not None and t < len(mask) and bool(mask[t])
        style = f"background:{_color(a, scale)};" + ("border-bottom:3px solid #000;" if edited else "")
        out.append(dict(text=tok or "\u2205", style=style, title=f"A={a:+.3f}"))
    return out


def group_view(view: dict) -> dict:
    """One logged sample group (a row of samples.jsonl) as the template draws it: a row per sample, then its
    repair's row where it has one in the loss."""
    rows = []
    for i, s in enumerate(view["samples"]):
        tag = "correct" if s["reward"] >= 0.5 else "wrong"
        rows.append(
            dict(
                label=f"y{i} R={s['reward']:.0f}", cls=tag, tokens=_tokens(s["tokens"], s["advantages"], s.get("mask"))
            )
        )
        if "repair" in s:
            r = s["repair"]
            edits = [a != 0 for a in r["advantages"]]
            rows.append(
                dict(label=f"repair of y{i}", cls="repair", tokens=_tokens(r["tokens"], r["advantages"], edits))
            )
    image = view.get("image")  # visual tasks: the group's image, a PNG data URI (trainer/vision.py)
    return dict(step=view["step"], prompt=view["prompt"], answer=str(view["answer"]), rows=rows, image=image)


def _read_json(path) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _windows(n: int) -> tuple[slice, slice]:
    """The first and last steps to compare: 10 each, fewer in a short run so that they never overlap (a run of
    n < 20 steps compares its first and second halves; one step, itself)."""
    w = max(1, min(10, n // 2))
    return slice(0, w), slice(max(n - w, 0), n)


def _mean(rows, key):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def _steps(rows) -> str:
    a, b = rows[0]["step"], rows[-1]["step"]
    return f"step {a}" if a == b else f"steps {a}-{b}"


def report_context(run_dir: str) -> dict:
    """What the template shows, from the run directory's files; PNGs are written beside them."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    views = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    cfg = _read_json(os.path.join(run_dir, "config.json"))
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    pngs = plot_metrics(rows, run_dir)
    if rows:
        summary_figure(rows, os.path.join(run_dir, "overview.png"))
    images = []
    for name in pngs:
        with open(os.path.join(run_dir, name), "rb") as f:
            images.append((name, base64.b64encode(f.read()).decode()))
    evals = [
        (key, how, summary.get(f"initial_{key}"), summary.get(key))
        for key, how in EVALS.items()
        if f"initial_{key}" in summary or key in summary
    ]
    table, columns = [], []
    if rows:
        first, last = (rows[s] for s in _windows(len(rows)))
        columns = [_steps(first)] if first == last else [_steps(first), _steps(last)]
        for key in TABLE:
            if any(key in r for r in rows):
                table.append((key, [_mean(first, key)] if first == last else [_mean(first, key), _mean(last, key)]))
    present = {k for r in rows for k in r} | {k for k, *_ in evals}
    legend = [(k, title, line) for k, (title, line) in METRICS.items() if k in present]
    legend += [(k, k, "(not described by this report)") for k in sorted(present - set(METRICS) - {"step"})]
    # Prefer groups that show a repair, then the latest ones.
    shown = sorted(views, key=lambda v: (not any("repair" in s for s in v["samples"]), -v["step"]))[:4]
    shown.sort(key=lambda v: v["step"])
    last = rows[-1] if rows else {}
    return dict(
        name=os.path.basename(os.path.normpath(run_dir)),
        run_dir=run_dir,
        algo=cfg.get("algo", "?"),
        seed=cfg.get("seed", "?"),
        steps=summary.get("steps", last.get("step")),
        generated_tokens=summary.get("generated_tokens", last.get("generated_tokens")),
        time=summary.get("time", last.get("time")),
        processes=last.get("processes"),
        resumed_at=summary.get("resumed_at", []),
        evals=evals,
        columns=columns,
        table=table,
        images=images,
        legend=legend,
        groups=[group_view(v) for v in shown],
    )


def _number(x) -> str:
    """A table cell: integers as such, other numbers to 3 decimals, missing as a dash."""
    if x is None:
        return "–"
    if float(x).is_integer() and abs(x) >= 10:
        return f"{int(x):,}"
    return f"{x:.3f}"


def write_report(run_dir: str) -> str:
    """Render report.html into the run directory (and its PNGs); returns its path."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["j2"]), undefined=StrictUndefined
    )
    env.filters["number"] = _number
    page = env.get_template("report.html.j2").render(**report_context(run_dir))
    path = os.path.join(run_dir, "report.html")
    write_atomic(path, page)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = argv[0] if argv else "runs/default"
    if not os.path.isdir(run_dir):
        print(f"credit-ops report: run directory {run_dir!r} does not exist", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        print(f"credit-ops report: {run_dir!r} holds no metrics.jsonl (not a run directory?)", file=sys.stderr)
        return 2
    print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
