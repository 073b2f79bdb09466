"""Print a side-by-side table from pytest-benchmark JSON files: per group, each implementation's median,
its ratio to the eager reference, GB/s, fraction of the copy bandwidth and peak extra memory.

    python benchmarks/summarize.py results.json [more.json ...] [--markdown] [--merge merged.json]
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
            vs_eager = eager["stats"]["median"] / b["stats"]["median"] if eager else float("nan")
            yield {
                "group": group,
                "impl": info.get("impl", b["name"]),
                "median_ms": f"{median_ms:.3f}",
                "speedup_vs_eager": f"{vs_eager:.2f}x",
                "GB/s": info.get("GB/s", ""),
                "frac_of_copy": info.get("frac_of_copy", ""),
                "peak_extra_GB": info.get("peak_extra_GB", ""),
                **{k: v for k, v in info.items() if k.startswith("x_")},
            }


def main():
    args = sys.argv[1:]
    merge_to = args[args.index("--merge") + 1] if "--merge" in args else None
    paths = [a for a in args if a.endswith(".json") and a != merge_to]
    data = load(paths)
    if merge_to:
        with open(merge_to, "w") as f:
            json.dump(data, f)
    table = list(rows(data))
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
