"""Print a side-by-side table from pytest-benchmark JSON files: per group, each implementation's median,
its ratio to the eager reference, GB/s, fraction of the copy bandwidth and peak extra memory.

    python benchmarks/summarize.py results.json [more.json ...] [--markdown] [--merge merged.json] [--verdicts]

``--verdicts`` prints instead, per group, the targets of benchmarks/results/README.md that one run can decide:
credit_ops (the default call) against torch.compile of the same computation (met when no slower), and the fused LM
head against its three matmuls alone (met within 1.2x on the CPU).
"""

import json
import sys
from collections import defaultdict


def load(paths):
    merged = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    return merged or {"benchmarks": []}


def rows(data):
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    for group, benches in sorted(groups.items()):
        eager = next((b for b in benches if b["extra_info"].get("impl") == "eager"), None)
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            info = b["extra_info"]
            median_ms = b["stats"]["median"] * 1e3
            vs_eager = f"{eager['stats']['median'] / b['stats']['median']:.2f}x" if eager else ""
            yield {
                "group": group,
                "impl": info.get("impl", b["name"]),
                "median_ms": f"{median_ms:.3f}",
                "speedup_vs_eager": vs_eager,
                "GB/s": info.get("GB/s", ""),
                "frac_of_copy": info.get("frac_of_copy", ""),
                "peak_extra_GB": info.get("peak_extra_GB", ""),
                **{k: v for k, v in info.items() if k.startswith("x_")},
            }


MATMUL_BOUND = 1.2  # the fused LM head within 1.2x of its three matmuls on the CPU (issue 15)


def verdicts(data):
    """Per group with a torch.compile or a matmuls-only row: credit_ops's median against it, and the verdict."""
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]][b["extra_info"].get("impl", b["name"])] = b["stats"]["median"]
    for group, impls in sorted(groups.items()):
        ours = impls.get("credit_ops")
        if ours is None:
            continue
        for peer, bound in (("torch_compile", 1.0), ("matmuls_only", MATMUL_BOUND)):
            if peer in impls:
                ratio = ours / impls[peer]
                yield {
                    "group": group,
                    "credit_ops_ms": f"{ours * 1e3:.3f}",
                    "vs": peer,
                    "peer_ms": f"{impls[peer] * 1e3:.3f}",
                    "ratio": f"{ratio:.2f}x",
                    "target": f"<= {bound:.2f}x",
                    "verdict": "met" if ratio <= bound else "NOT MET",
                }


def main():
    args = sys.argv[1:]
    merge_to = args[args.index("--merge") + 1] if "--merge" in args else None
    paths = [a for a in args if a.endswith(".json") and a != merge_to]
    data = load(paths)
    if merge_to:
        with open(merge_to, "w") as f:
            json.dump(data, f)
    table = list(verdicts(data) if "--verdicts" in args else rows(data))
    if not table:
        print("no benchmarks in", *paths)
        return
    cols = list(dict.fromkeys(k for r in table for k in r))
    if "--markdown" in args:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in table:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in table)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in table:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


if __name__ == "__main__":
    main()
