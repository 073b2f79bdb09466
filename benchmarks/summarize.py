"""Print a side-by-side table from a pytest-benchmark JSON file: per group, each implementation's median,
its ratio to the eager reference, GB/s, fraction of the copy bandwidth and peak extra memory.

    python benchmarks/summarize.py results.json [--markdown]
"""

import json
import sys
from collections import defaultdict


def rows(path):
    with open(path) as f:
        data = json.load(f)
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
    path = sys.argv[1]
    table = list(rows(path))
    if not table:
        print("no benchmarks in", path)
        return
    cols = list(dict.fromkeys(k for r in table for k in r))
    if "--markdown" in sys.argv:
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
