"""`make experiment`: its statistics, its table, and the README's table against the committed results file."""

import json
import os
import statistics

import pytest
from credit_ops.trainer.experiment import (
    README_END,
    README_START,
    bootstrap_ci,
    main,
    readme_markers,
    render,
    summarise,
    write_readme_table,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "results, table",
    [("experiment_results.json", "experiment-table"), ("experiment_vlm_results.json", "experiment-vlm-table")],
)
def test_readme_table_is_the_committed_results_file(results, table):
    """The README's experiment tables are render() of the committed docs/*results.json, byte for byte: a table
    edited by hand, or a results file replaced without regenerating the README (`make experiment-readme`), fails."""
    with open(os.path.join(ROOT, "docs", results)) as f:
        expected = render(json.load(f))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = readme_markers(table)
    assert start in readme and end in readme
    got = readme.split(start, 1)[1].split(end, 1)[0]
    assert got == "\n" + expected


def test_bootstrap_interval():
    assert bootstrap_ci([0.5] * 5) == (0.5, 0.5)
    xs = [0.1, 0.4, 0.35, 0.8, 0.55]
    lo, hi = bootstrap_ci(xs)
    assert min(xs) <= lo < statistics.fmean(xs) < hi <= max(xs)
    lo2, hi2 = bootstrap_ci(xs * 8)  # more seeds with the same spread: a narrower interval
    assert hi2 - lo2 < (hi - lo) / 2
    assert bootstrap_ci(xs) == (lo, hi)  # seeded: reproducible


def _rows(acc, grad, active, tokens_per_step=100):
    return [
        {
            "step": i + 1,
            "accuracy": a,
            "grad_norm": g,
            "active_tokens": active,
            "repair_success": 0.5,
            "generated_tokens": tokens_per_step * (i + 1),
        }
        for i, (a, g) in enumerate(zip(acc, grad, strict=True))
    ]


def _summary(greedy, sampled):
    return {
        "eval_accuracy": greedy,
        "eval_sampled_accuracy": sampled,
        "initial_eval_accuracy": 0.5,
        "initial_eval_sampled_accuracy": 0.3,
    }


def test_summarise_and_render_pair_by_seed():
    runs = {
        "GRPO": [
            (_rows([0.2, 0.4, 0.7], [1, 2, 3], 1.0), _summary(0.6, 0.4)),
            (_rows([0.1] * 3, [1] * 3, 1.0), _summary(0.7, 0.5)),
        ],
        "IBPO": [
            (_rows([0.9, 0.9, 0.9], [1, 1, 1], 0.3), _summary(0.7, 0.5)),
            (_rows([0.1] * 3, [2] * 3, 0.2), _summary(0.8, 0.6)),
        ],
    }
    t = summarise(runs, target=0.5)
    assert t["GRPO"]["steps_to_target"] == [None, None]  # moving averages 0.2, 0.3, 0.433: never 0.5
    assert t["IBPO"]["steps_to_target"] == [1, None] and t["IBPO"]["tokens_to_target"] == [100, None]
    assert t["GRPO"]["grad_norm_variance"] == [pytest.approx(2 / 3), 0.0]
    assert t["IBPO"]["active_start"] == pytest.approx([0.3, 0.2])
    md = render({"options": {"budget": 300, "target": 0.5, "eval_prompts": 8, "temperature": 0.7}, "table": t})
    ibpo = next(line for line in md.splitlines() if line.startswith("| IBPO "))
    # greedy +0.1 on both seeds: the paired difference and its interval are exactly +0.1
    assert "| +0.100 [+0.100, +0.100] |" in ibpo
    assert "(1/2)" in ibpo and "0.25 → 0.25" in ibpo
    assert render({"options": {"budget": 300, "target": 0.5, "eval_prompts": 8, "temperature": 0.7}, "table": t}) == md


def test_write_readme_table(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"head\n{README_START}\nold\n{README_END}\ntail\n")
    write_readme_table(str(p), "| new |\n")
    assert p.read_text() == f"head\n{README_START}\n| new |\n{README_END}\ntail\n"
    vlm_start, vlm_end = readme_markers("experiment-vlm-table")
    p.write_text(f"{README_START}\nold\n{README_END}\n{vlm_start}\nx\n{vlm_end}\n")
    write_readme_table(str(p), "| vlm |\n", "experiment-vlm-table")
    assert p.read_text().endswith(f"{vlm_start}\n| vlm |\n{vlm_end}\n")
    assert "old" in p.read_text()  # the other table untouched
    p.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        write_readme_table(str(p), "x")


TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "warm_start.steps=20",
    "warm_start.batch_size=16",
    "warm_start.revision_batch_size=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "revise.max_new_tokens=24",
    "eval_prompts=8",
]


def test_experiment_end_to_end(tmp_path, capsys):
    """Two methods, two seeds, a tiny budget: every run ends within it, the results file renders, --render and
    --readme rebuild the same table."""
    out = tmp_path / "exp"
    argv = ["seeds=2", "budget=400", "methods=GRPO,IBPO", f"out={out}", f"warm_start.cache_dir={tmp_path / 'c'}"]
    assert main([*argv, *TINY]) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    assert list(res["table"]) == ["GRPO", "IBPO"]
    for t in res["table"].values():
        assert len(t["greedy"]) == 2 and all(0 <= x <= 1 for x in t["greedy"] + t["sampled"])
        assert all(tok >= 400 for tok in t["tokens"])  # each run stops at the first step past the budget
    # the same warm start for every run: per seed (the eval set is the seed's), one initial accuracy
    for i in range(2):
        assert len({t["initial_greedy"][i] for t in res["table"].values()}) == 1
    assert (out / "experiment.png").stat().st_size > 0
    capsys.readouterr()
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    assert main(["--render", str(out / "results.json"), "--readme", str(readme)]) == 0
    assert readme.read_text() == f"{README_START}\n{render(res)}{README_END}\n"
