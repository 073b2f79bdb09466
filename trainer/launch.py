"""How many processes the user asked for, to compare with how many run.

`accelerate launch --num_processes N` (accelerate 1.15) starts N processes only through its torchrun path, which it
takes with `--multi_gpu`, with an accelerate config file whose distributed_type is MULTI_GPU (or FSDP, DeepSpeed),
or when it sees two or more GPUs. Otherwise (a CPU machine, one GPU, `--cpu`) it takes its "simple" launcher, which
starts ONE process (several CPU processes only under mpirun, `--mpirun_hostfile`) and passes no process count on.
The child cannot see N in its environment, so it reads it where the user wrote it: the launcher's command line
(this process's parent: accelerate runs the workers itself, on both paths) or its config file. Under torchrun
WORLD_SIZE says it.

    accelerate launch --multi_gpu --num_processes 2 -m credit_ops.trainer    # 2 processes: gloo on CPU, NCCL on GPUs
    torchrun --standalone --nproc_per_node 2 -m credit_ops.trainer           # the same
"""

import os

import yaml

LAUNCH_FIX = (
    "`accelerate launch` starts one process unless given --multi_gpu, an accelerate config with a multi-process "
    "distributed_type, or two or more GPUs: use `accelerate launch --multi_gpu --num_processes {n} -m "
    "credit_ops.trainer ...` (DDP over gloo on the CPU, NCCL with one GPU per process) or `torchrun --standalone "
    "--nproc_per_node {n} -m credit_ops.trainer ...`"
)


def launcher_args(pid: int | None = None) -> list[str] | None:
    """The arguments of the `accelerate launch` that started process `pid` (default: this one), read from its
    parent's command line (Linux /proc); None when the parent is not accelerate's launcher or cannot be read."""
    ppid = os.getppid() if pid is None else pid
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    for i, a in enumerate(argv):
        name = os.path.basename(a)
        if name == "accelerate" and argv[i + 1 : i + 2] == ["launch"]:
            return argv[i + 2 :]
        if name == "accelerate-launch" or a == "accelerate.commands.launch" or a.endswith("commands/launch.py"):
            return argv[i + 1 :]
    return None


def _option(args: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` (also spelled with dashes) among a launcher's own options."""
    spellings = {name, name.replace("_", "-")}
    for i, a in enumerate(args):
        if a in ("-m", "--module") or a.endswith(".py"):  # the training script: its arguments are not ours
            break
        key, eq, value = a.partition("=")
        if key in spellings:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def requested_processes(launcher: list[str] | None, env: dict) -> tuple[int, str] | None:
    """(processes asked for, where) from accelerate launch's options, then its config file, then WORLD_SIZE;
    None when nothing names a number."""
    if launcher is not None:
        n = _option(launcher, "--num_processes")
        if n is not None and n.lstrip("-").isdigit():
            return int(n), f"accelerate launch --num_processes {n}"
        path = _option(launcher, "--config_file")
        if path is None:
            from accelerate.commands.config import default_config_file as path
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    n = (yaml.safe_load(f) or {}).get("num_processes")  # YAML or JSON, as accelerate writes them
            except (OSError, ValueError, AttributeError):
                n = None
            if isinstance(n, int) and n >= 1:
                return n, f"the accelerate config {path} (num_processes: {n})"
    if str(env.get("WORLD_SIZE", "")).isdigit():
        return int(env["WORLD_SIZE"]), f"WORLD_SIZE={env['WORLD_SIZE']}"
    return None


def process_count_problem(running: int, launcher: list[str] | None = None, env: dict | None = None) -> str | None:
    """A sentence when `running` processes differ from the number asked for, else None."""
    asked = requested_processes(launcher_args() if launcher is None else launcher, os.environ if env is None else env)
    if asked is None or asked[0] == running:
        return None
    n, where = asked
    fix = " " + LAUNCH_FIX.format(n=n) if running < n and "accelerate" in where else ""
    return f"running {running} process{'es' * (running != 1)} but {n} were asked for ({where}).{fix}"
