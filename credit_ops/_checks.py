"""Input validation shared by every public op. Errors name the argument and are raised before a kernel runs.

Shape, dtype and device checks are free (metadata only). Checks on *values* (ids in range, finite rewards)
need the data: on CPU they always run; on CUDA the mode decides, because an eager check waits on the GPU:

    "sync"   (default) read the check's result on the host and raise a ValueError
    "async"  queue a device-side assertion (torch._assert_async): no host synchronisation, CUDA-graph safe
    "off"    skip value checks

Set with CREDIT_OPS_VALUE_CHECKS or credit_ops.set_value_checks(). While torch.compile traces or a CUDA graph
captures, "sync" acts as "async" / "off" (there is no host value to read).
"""

import os

import torch

_MODES = ("sync", "async", "off")
_mode = os.environ.get("CREDIT_OPS_VALUE_CHECKS", "sync")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def set_value_checks(mode: str) -> None:
    """Choose how value checks run on CUDA tensors: "sync", "async" or "off" (see credit_ops._checks)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"value check mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def tensor(name: str, x, *, dtypes=None, dim=None, min_dim=None) -> None:
    check(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:  # the message is built only on failure (this runs per call)
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        check(False, f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if dim is not None:
        check(x.dim() == dim, f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    if min_dim is not None:
        check(x.dim() >= min_dim, f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")


def same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device: {where}")


def shape(name: str, x: torch.Tensor, expected, what: str = "") -> None:
    check(
        tuple(x.shape) == tuple(expected),
        f"{name} must have shape {tuple(expected)}{' ' + what if what else ''}, got {tuple(x.shape)}",
    )


def _value_mode(x: torch.Tensor) -> str:
    if torch.compiler.is_compiling():
        return "off"
    if x.device.type == "cpu":
        return "sync"
    if _mode == "sync" and x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "async"
    return _mode


def values(bad: torch.Tensor, msg: str) -> None:
    """Fail when any element of the boolean tensor ``bad`` is set (per the value-check mode)."""
    mode = _value_mode(bad)
    if mode == "off" or bad.numel() == 0:
        return
    if mode == "async":
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        raise ValueError(msg)


def values_each(bad: dict, msg: str) -> None:
    """``values`` for several tensors with one host synchronisation: ``bad`` maps a name to its boolean tensor,
    ``msg`` names the first offender through ``{name}``."""
    bad = {name: b for name, b in bad.items() if b.numel()}
    if not bad:
        return
    mode = _value_mode(next(iter(bad.values())))
    if mode == "off":
        return
    if mode == "async":
        for name, b in bad.items():
            torch._assert_async(~b.any(), msg.format(name=name))
        return
    flags = torch.stack([b.any() for b in bad.values()]).tolist()
    for name, flag in zip(bad, flags, strict=True):
        if flag:
            raise ValueError(msg.format(name=name))


def ids_in_range(name: str, ids: torch.Tensor, upper: int, *, ignore_index=None) -> None:
    """ids must lie in [0, upper), except entries equal to ignore_index."""
    bad = (ids < 0) | (ids >= upper)
    if ignore_index is not None:
        bad &= ids != ignore_index
    extra = f" (or equal ignore_index={ignore_index})" if ignore_index is not None else ""
    values(bad, f"{name} must lie in [0, {upper}){extra}")


def finite(name: str, x: torch.Tensor) -> None:
    values(~torch.isfinite(x), f"{name} must be finite (found NaN or inf)")
