"""`credit-train` / `python -m credit_ops.trainer`: train with a config file and key=value overrides.

credit-train                                   # the embedded default: tiny model, built-in task, IBPO, CPU
credit-train --config configs/grpo.yaml steps=50 name=grpo_short
accelerate launch --num_processes 2 -m credit_ops.trainer algo=diff_feedback
"""

import json
import sys

from .config import ConfigError, load_config


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"credit-train: config error: {e}", file=sys.stderr)
        return 2
    from .train import NonFiniteError, train  # heavy imports only after the config is known to be valid

    try:
        summary = train(cfg)
    except NonFiniteError as e:  # too many non-finite steps in a row: the checkpoint it names is usable
        print(f"credit-train: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
