"""Input validation shared by every public op. Errors name the argument and are raised before a kernel runs.

Shape, dtype and device checks are free (metadata only). Checks on *values* (ids in range, finite rewards) need
the data. On CPU they always run, raise a ``ValueError`` at the call and cost no synchronisation (each is one pass in
C++, csrc/cpu/checks.cpp; without the compiled extension one or two reductions and a scalar read: a range check is
one ``aminmax``, a finiteness check one ``sum``, with an exact element-wise pass only to confirm a failure). On
CUDA the mode decides, because reading a result on the host waits for the GPU:

    "async"  (default on CUDA) queue a device-side assertion (torch._assert_async with the check's message): no host
             synchronisation, CUDA-graph safe, nothing waits. A bad value is reported at the next synchronisation
             after the assertion runs on the GPU (a .item(), .cpu(), .tolist(), torch.cuda.synchronize(), a printed
             tensor, the optimizer's host read ...): that call raises a RuntimeError (``torch.AcceleratorError``,
             "CUDA error: device-side assert triggered") and the assertion's message ("labels must lie in [0, V)
             ...") is printed to stderr by the device. As for any device-side assert, the CUDA context is unusable
             afterwards (the process has to exit), so no result of the work queued behind a failed check can be read.
    "sync"   read the check's result on the host and raise the ValueError at the call (one synchronisation per
             call: each op's checks share it where they can); for debugging where a bad value comes from
    "off"    skip value checks on CUDA

Set with CREDIT_OPS_VALUE_CHECKS or credit_ops.set_value_checks(). CPU tensors are always checked on the host (the
mode does not apply to them). While torch.compile traces, value checks are off; while a CUDA graph captures, "sync"
acts as "async" (there is no host value to read).
"""

import math
import os

import torch

_MODES = ("sync", "async", "off")


def _validate(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"value check mode must be one of {_MODES}, got {mode!r}")
    return mode


_mode = _validate(os.environ.get("CREDIT_OPS_VALUE_CHECKS", "async"))

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def set_value_checks(mode: str) -> str:
    """Choose how value checks run on CUDA tensors: "async" (default), "sync" or "off" (see credit_ops._checks).
    Returns the previous mode (to restore it)."""
    global _mode
    previous, _mode = _mode, _validate(mode)
    return previous


def value_checks() -> str:
    """The current value-check mode for CUDA tensors."""
    return _mode


def check(cond: bool, msg) -> None:
    """Raise ValueError(msg) unless cond. ``msg`` may be a zero-argument callable (``lambda: f"..."``): the message is
    then formatted only on failure (an f-string with a tuple in it costs ~2 us, and the checks run on every call)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def tensor(name: str, x, *, dtypes=None, dim=None, min_dim=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:  # the message is built only on failure (this runs per call)
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")


def same_device(**tensors) -> None:
    device = None
    for v in tensors.values():
        if v is None:
            continue
        if device is None:
            device = v.device
        elif v.device != device:
            where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items() if t is not None)
            raise ValueError(f"all tensors must be on one device: {where}")


def shape(name: str, x: torch.Tensor, expected, what: str = "") -> None:
    if x.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{' ' + what if what else ''}, got {tuple(x.shape)}")


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


_native_checks = None  # whether credit::values_within / values_finite have CPU kernels (no compiled extension: no)


def _native_cpu(x: torch.Tensor, where) -> bool:
    """Whether a value check of the CPU tensor x runs in its C++ pass (csrc/cpu/checks.cpp)."""
    global _native_checks
    if _native_checks is None:
        _native_checks = torch._C._dispatch_has_kernel_for_dispatch_key("credit::values_finite", "CPU")
    return x.is_cpu and (where is None or where.shape == x.shape) and _native_checks


def within_range(x: torch.Tensor, low, high, msg: str, *, allow=None, where=None) -> None:
    """Fail unless every element of ``x`` lies in [low, high] (a bound None: unbounded) or equals ``allow``; NaN
    fails. ``where`` (bool, x's shape): only those elements count. On CPU tensors one pass in C++
    (credit::values_within; integers compared exactly). Otherwise the allowed and uncounted elements are replaced by
    an in-range value, then one reduction decides: on the host an ``aminmax`` and one scalar read (exact: a bad
    element makes the min or max leave the range), on CUDA in "async" mode a device-side assertion (7 small launches
    for ids with an ignore_index, no synchronisation)."""
    mode = _value_mode(x)
    if mode == "off" or x.numel() == 0:
        return
    if mode == "sync" and _native_cpu(x, where):
        if not torch.ops.credit.values_within(x, low, high, allow, where):
            raise ValueError(msg)
        return
    fill = low if low is not None else high
    if allow is not None:
        x = x.masked_fill(x == allow, fill)
    if where is not None:
        x = torch.where(where, x, fill)
    if mode == "async":
        ok = x >= low if low is not None else None
        if high is not None:
            ok = x <= high if ok is None else ok & (x <= high)
        torch._assert_async(ok.all(), msg)
        return
    lo, hi = (v.item() for v in torch.aminmax(x))
    if (low is not None and not lo >= low) or (high is not None and not hi <= high):  # `not >=`: NaN fails
        raise ValueError(msg)


def ids_in_range(name: str, ids: torch.Tensor, upper: int, *, ignore_index=None) -> None:
    """ids must lie in [0, upper), except entries equal to ignore_index."""
    extra = f" (or equal ignore_index={ignore_index})" if ignore_index is not None else ""
    within_range(ids, 0, upper - 1, f"{name} must lie in [0, {upper}){extra}", allow=ignore_index)


def finite_each(tensors: dict, msg: str, *, where=None) -> None:
    """Fail when a tensor of ``tensors`` (name -> float tensor or None) holds a NaN or inf (only where ``where``,
    bool, is set, when given); ``msg`` names the first offender through ``{name}``. On CPU tensors one C++ pass each
    (credit::values_finite). Otherwise one float64 sum per tensor decides (it is finite exactly when every summed
    element is, since no float32 / float16 / bfloat16 sum can overflow float64): on the host with one scalar read
    for all of them, and an element-wise pass only to name the offender; on CUDA in "async" mode as a device-side
    assertion per tensor (float64 input: element-wise)."""
    tensors = {k: t for k, t in tensors.items() if t is not None and t.numel()}
    if not tensors:
        return
    mode = _value_mode(next(iter(tensors.values())))
    if mode == "off":
        return
    if mode == "sync" and all(_native_cpu(t, where) for t in tensors.values()):
        for name, t in tensors.items():
            if not torch.ops.credit.values_finite(t, where):
                raise ValueError(msg.format(name=name))
        return
    masked = lambda t: t if where is None else torch.where(where, t, 0)
    if mode == "async":
        for name, t in tensors.items():
            if t.dtype == torch.float64:  # its float64 sum may overflow: element-wise
                ok = ~(~torch.isfinite(t) if where is None else ~torch.isfinite(t) & where).any()
            else:
                total = masked(t).sum(dtype=torch.float64)
                ok = (total - total) == 0  # False for inf and NaN
            torch._assert_async(ok, msg.format(name=name))
        return
    total = None
    for t in tensors.values():
        s = masked(t).sum(dtype=torch.float64)
        total = s if total is None else total + s
    if math.isfinite(total.item()):
        return
    bad = {}
    for name, t in tensors.items():
        b = ~torch.isfinite(t)
        bad[name] = b if where is None else b & where
    values_each(bad, msg)


def finite(name: str, x: torch.Tensor) -> None:
    finite_each({name: x}, "{name} must be finite (found NaN or inf)")
