"""Build credit_ops._C for the torch of this environment ahead of time, and say which _C is used.

    python -m credit_ops.build            # build if needed (what `import credit_ops` would do), then report
    python -m credit_ops.build --force    # compile a fresh cache entry even if a matching _C exists

Useful before launching many processes (DDP ranks), in a container build step, or to see why an import warns.
Importing credit_ops does the same on first use (credit_ops/_extension.py); exit status 1 when _C is unavailable.
"""

import argparse
import os
import subprocess
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m credit_ops.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="compile a fresh cache entry even if one matches")
    opts = parser.parse_args(argv)
    import credit_ops  # noqa: F401  (`-m` imported it already: it loaded or built _C, or warned)
    from credit_ops._extension import info

    if opts.force and not info["built"]:
        # A process can load _C once: the forced rebuild runs in a fresh interpreter.
        env = {**os.environ, "CREDIT_OPS_REBUILD": "1"}
        return subprocess.call([sys.executable, "-m", "credit_ops.build"], env=env)

    if info["error"]:
        print(f"credit_ops._C: NOT AVAILABLE\n{info['error']}", file=sys.stderr)
        return 1
    print(f"credit_ops._C: {info['path']} ({info['origin']}{', built now' if info['built'] else ''})")
    key = info["key"]
    if key:
        kind = f"CUDA {key['torch_cuda']}, arch {key['arch_list']}" if key["cuda"] else "CPU kernels only"
        print(f"  for torch {key['torch']} ({kind}), {key['python'].strip('.')}, sources {key['sources'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
