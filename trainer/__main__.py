"""`credit-train` / `python -m credit_ops.trainer`: train with a config file and key=value overrides.

usage: credit-train [--config NAME|FILE]... [--print-config] [key=value ...]

  credit-train                                   # the embedded default: tiny model, built-in task, IBPO, CPU
  credit-train --config grpo steps=50 name=grpo_short
  credit-train --config ibpo --print-config      # the resolved configuration as YAML; nothing runs
  accelerate launch --multi_gpu --num_processes 2 -m credit_ops.trainer algo=diff_feedback
  torchrun --standalone --nproc_per_node 2 -m credit_ops.trainer algo=diff_feedback

--config NAME|FILE  a YAML file, or a shipped config by name; several merge in order. Shipped:
                    {configs}
--print-config      print the resolved configuration (YAML, readable by --config) and exit
key=value           any key below (also --key=value, --key value); after the config files

Several processes (DDP; gloo on the CPU, NCCL on GPUs, one process per GPU): `accelerate launch --multi_gpu
--num_processes N` or `torchrun --standalone --nproc_per_node N`; rollout.prompts_per_step is per process.
`accelerate launch --num_processes N` without --multi_gpu starts ONE process unless it sees two or more GPUs (or
an `accelerate config` file says MULTI_GPU); the trainer warns when it runs fewer processes than were asked for.
FSDP: an `accelerate config` file.

The run directory (out_dir/name) receives config.yaml (the resolved configuration), metrics.jsonl, samples.jsonl,
checkpoints/, summary.json and report.html. Exit codes: 0 done, 2 configuration error, 3 too many non-finite steps.

Keys (key=default  (type)  help):

{keys}
"""

import json
import os
import sys

from .config import ConfigError, help_text, load_config, shipped_configs, to_yaml


def usage() -> str:
    return __doc__.format(configs=", ".join(shipped_configs()), keys=help_text())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `credit-train --help | head`
            sys.stdout = open(os.devnull, "w")
        return 0
    print_config = "--print-config" in argv
    try:
        cfg = load_config([a for a in argv if a != "--print-config"])
    except ConfigError as e:
        print(f"credit-train: config error: {e}", file=sys.stderr)
        return 2
    if print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .train import NonFiniteError, train  # heavy imports only after the config is known to be valid

    try:
        summary = train(cfg)
    except ConfigError as e:  # found only once the run starts (an existing run directory)
        print(f"credit-train: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # too many non-finite steps in a row: the checkpoint it names is usable
        print(f"credit-train: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
