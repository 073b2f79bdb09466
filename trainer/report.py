"""Plots and report.html from a run directory (metrics.jsonl, samples.jsonl, config.json).

    python -m credit_ops.trainer.report runs/default

PNG per curve (reward, accuracy, repair success, active-token ratio, entropy, gradient norm and its
across-step variance) and one self-contained HTML page: the curves inline, then token-credit views of sample
groups (a failed trajectory, its repair, the edit mask and the per-token advantages, coloured token by token).
"""

import base64
import html
import json
import os
import sys

PLOTS = [
    ("reward", "reward (mean)"),
    ("accuracy", "accuracy (sampled)"),
    ("repair_success", "repair success rate"),
    ("active_tokens", "active-token ratio"),
    ("entropy", "policy entropy (nats/token)"),
    ("grad_norm", "gradient norm"),
    ("grad_norm_var", "gradient-norm variance (last 10 steps)"),
]


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


def smooth(ys, w):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


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
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
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
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
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


def _tokens_html(tokens, advs, mask=None) -> str:
    scale = max([abs(a) for a in advs] + [1e-6])
    spans = []
    for t, (tok, a) in enumerate(zip(tokens, advs, strict=False)):
        edited = mask is not None and t < len(mask) and mask[t]
        style = f"background:{_color(a, scale)};" + ("border-bottom:3px solid #000;" if edited else "")
        shown = html.escape(tok).replace(" ", "&nbsp;") or "&empty;"
        spans.append(f'<span class="tok" style="{style}" title="A={a:+.3f}">{shown}</span>')
    return "".join(spans)


def group_html(view: dict) -> str:
    rows = [
        f"<h3>step {view['step']}: <code>{html.escape(view['prompt'])}</code> "
        f"(answer {html.escape(str(view['answer']))})</h3><table>"
    ]
    for i, s in enumerate(view["samples"]):
        tag = "correct" if s["reward"] >= 0.5 else "wrong"
        rows.append(
            f'<tr><td class="lab {tag}">y{i} R={s["reward"]:.0f}</td>'
            f"<td>{_tokens_html(s['tokens'], s['advantages'], s.get('mask'))}</td></tr>"
        )
        if "repair" in s:
            r = s["repair"]
            rows.append(
                f'<tr><td class="lab repair">repair of y{i}</td>'
                f"<td>{_tokens_html(r['tokens'], r['advantages'], [a != 0 for a in r['advantages']])}</td></tr>"
            )
    rows.append("</table>")
    return "\n".join(rows)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
.plots img{width:32%;margin:0.5%;border:1px solid #ddd}
.tok{font-family:monospace;font-size:15px;padding:1px 0;margin:0}
td{padding:2px 8px;vertical-align:middle}.lab{font-size:12px;white-space:nowrap}
.correct{color:#238b45}.wrong{color:#cb181d}.repair{color:#2171b5}
table.sum td{font-family:monospace;border-bottom:1px solid #eee}
"""


def write_report(run_dir: str) -> str:
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    views = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    cfg = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    pngs = plot_metrics(rows, run_dir)
    if rows:
        summary_figure(rows, os.path.join(run_dir, "overview.png"))
    imgs = []
    for name in pngs:
        with open(os.path.join(run_dir, name), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        imgs.append(f'<img src="data:image/png;base64,{data}" alt="{name}">')
    summary = ""
    if rows:
        first, last = rows[: min(10, len(rows))], rows[-min(10, len(rows)) :]

        def avg(rs, k):
            vals = [r[k] for r in rs if k in r]
            return sum(vals) / len(vals) if vals else float("nan")

        keys = ["reward", "accuracy", "repair_success", "active_tokens", "entropy", "grad_norm"]
        summary = "<table class='sum'><tr><td></td><td>first 10 steps</td><td>last 10 steps</td></tr>" + "".join(
            f"<tr><td>{k}</td><td>{avg(first, k):.3f}</td><td>{avg(last, k):.3f}</td></tr>" for k in keys
        )
        ev = [r for r in rows if "eval_accuracy" in r]
        if ev:
            summary += (
                f"<tr><td>greedy held-out accuracy</td><td>{ev[0]['eval_accuracy']:.3f} (step {ev[0]['step']})</td>"
                f"<td>{ev[-1]['eval_accuracy']:.3f} (step {ev[-1]['step']})</td></tr>"
            )
        summary += f"</table><p>{rows[-1]['step']} steps, {rows[-1]['generated_tokens']} generated tokens, "
        summary += f"{rows[-1]['time']:.0f} s.</p>"
    # Prefer groups that show a repair, then the latest ones.
    shown = sorted(views, key=lambda v: (not any("repair" in s for s in v["samples"]), -v["step"]))[:4]
    shown.sort(key=lambda v: v["step"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>credit-ops run {html.escape(run_dir)}</title>
<style>{CSS}</style></head><body>
<h1>credit-ops run: {html.escape(os.path.basename(os.path.normpath(run_dir)))}</h1>
<p>algorithm <b>{html.escape(str(cfg.get("algo", "?")))}</b>, seed {cfg.get("seed", "?")}</p>
{summary}
<h2>Curves</h2><div class="plots">{"".join(imgs)}</div>
<h2>Token credit</h2>
<p>Each token is coloured by its advantage (green positive, red negative, white zero; hover for the value);
an underline marks the edit mask (tokens the repair changed). Sequence-level methods give every token of a
sample the same colour; IBPO / Difference Feedback concentrate the negative credit on the edited tokens and
train the repair's inserted tokens positively.</p>
{"".join(group_html(v) for v in shown) or "<p>(no sample groups logged)</p>"}
</body></html>"""
    path = os.path.join(run_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
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
