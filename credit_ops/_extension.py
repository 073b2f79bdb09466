"""Loading credit_ops._C, the compiled C++ (and CUDA) kernels, built against the torch that runs it.

(The build switches and flags are in credit_ops/_build.py, shared with setup.py; the command line is
credit_ops/build.py.)

``import credit_ops`` calls load_extension(), which uses, in this order:

1. the _C installed with the package (`pip install --no-build-isolation`, `make build`), if the build record beside
   it (_C.<suffix>.build.json, written by setup.py) says it was built for this torch, this Python and these
   sources; a _C built for another torch is never loaded (it would fail on undefined symbols, or worse). In a
   source checkout whose csrc/ changed since, the in-place _C is loaded with a warning to run `make build`;
2. the cache entry for this build key (torch version, CUDA, arch list, flags, source hash) under
   $CREDIT_OPS_CACHE (default ~/.cache/credit_ops, or $XDG_CACHE_HOME/credit_ops);
3. otherwise it compiles one there with torch.utils.cpp_extension.load, from the same sources and flags as setup.py
   (credit_ops/_build.py), printing one line and its progress to stderr. A file lock makes concurrent processes
   (DDP ranks, pytest-xdist workers) build it once; the others wait and load it.

When _C cannot be built (no C++ compiler, no ninja, a compile error), importing credit_ops still works: a warning
says which ops are unavailable, the Triton ops run, ``CREDIT_OPS_BACKEND=reference`` runs every op, and calling a
compiled op raises an error that says why it is missing and how to build it.

Prebuild explicitly (e.g. before launching many ranks, or in a Docker build step)::

    python -m credit_ops.build            # builds if needed, then says which _C is used and where
    python -m credit_ops.build --force    # compiles a fresh cache entry even if one exists

Environment: CREDIT_OPS_CACHE (cache root), CREDIT_OPS_REBUILD=1 (ignore the installed _C and the cache entry:
compile afresh), CREDIT_OPS_REQUIRE_EXT=1 (raise instead of warning when _C cannot be built), and the build
switches of credit_ops/_build.py (CREDIT_OPS_SKIP_CUDA, CREDIT_OPS_FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
CREDIT_OPS_DEBUG).
"""

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
import warnings

from credit_ops import _build

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (the build itself is Linux / macOS only)
    fcntl = None

RECORD = "build.json"  # in a cache entry, written last: its presence means the entry is complete


class ExtensionUnavailable(RuntimeError):
    """credit_ops._C cannot be loaded or built here; the message says why and what to do."""


class ExtensionUnavailableWarning(UserWarning):
    pass


class ExtensionStaleWarning(UserWarning):
    pass


# What load_extension() did, for `python -m credit_ops.build`, tests and bug reports.
info: dict = {"origin": None, "path": None, "key": None, "built": False, "skipped": [], "error": None}


def _say(msg: str) -> None:
    print(f"credit_ops: {msg}", file=sys.stderr, flush=True)


def cache_root() -> str:
    root = os.environ.get("CREDIT_OPS_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "credit_ops")
    return os.path.abspath(root)


def _import_so(path: str):
    spec = importlib.util.spec_from_file_location(_build.EXT_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the TORCH_LIBRARY registrations
    sys.modules[_build.EXT_NAME] = module
    return module


def _installed(key: dict, checkout: bool):
    """The _C installed with the package if it can run here, else None (the reason goes to info["skipped"]).
    ``checkout``: the sources are a source checkout's csrc/ (editable install, make build), not a wheel's."""
    spec = importlib.util.find_spec(_build.EXT_NAME)
    if spec is None or not spec.origin:
        return None
    recorded = _build.read_sidecar(spec.origin)
    if recorded is not None:
        kind, why = _build.compatible(recorded, key)
        if kind == "abi" or (kind == "sources" and not checkout):
            info["skipped"].append(f"{spec.origin}: {why}")
            return None
        if kind == "sources":
            # A checkout whose csrc/ changed since `make build`: load it, as before, but say so (rebuilding it in
            # place is `make build`'s incremental job, not the import's).
            warnings.warn(
                f"credit_ops: {spec.origin} was {why}: run `make build` (or `python setup.py build_ext "
                "--inplace`) to rebuild it",
                ExtensionStaleWarning,
                stacklevel=4,
            )
    # Without a record (an older setup.py, the CMake build): try it, and build one if it does not load.
    try:
        module = importlib.import_module(_build.EXT_NAME)
    except (ImportError, OSError) as e:
        info["skipped"].append(f"{spec.origin}: does not load ({e})")
        return None
    info.update(origin="installed", path=spec.origin)
    return module


def cached_entry(entry: str, key: dict) -> str | None:
    """The built _C in cache directory ``entry`` if that entry is complete and was built for exactly ``key``."""
    so = os.path.join(entry, "_C.so")
    try:
        with open(os.path.join(entry, RECORD)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return so if recorded == key and os.path.isfile(so) else None


@contextlib.contextmanager
def _lock(path: str, entry: str):
    """An exclusive flock (released by the kernel if the holder dies: no stale lock can block later builds)."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is compiling credit_ops._C into {entry} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _env(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _progress(entry: str, total: int, stop: threading.Event, t0: float) -> None:
    """One line per compiled object (and a heartbeat every 30 s): a first-import build takes a minute or more."""
    done, last = 0, time.monotonic()
    while not stop.wait(1.0):
        try:
            n = sum(1 for f in os.listdir(entry) if f.endswith(".o"))
        except OSError:
            n = done
        now = time.monotonic()
        if n > done:
            done, last = n, now
            _say(f"  [{min(n, total)}/{total}] compiled ({now - t0:.0f} s)")
        elif now - last >= 30:
            last = now
            _say(f"  still compiling ({now - t0:.0f} s)")


def _check_toolchain(torch, cuda: bool) -> None:
    cxx = os.environ.get("CXX", "c++")
    prog = (shlex.split(cxx) or ["c++"])[0]
    if shutil.which(prog) is None:
        raise ExtensionUnavailable(
            f"no C++ compiler: `{cxx}` ($CXX, default c++) is not on PATH. Install one (e.g. `apt-get install g++`, "
            "`conda install gxx`), or set CXX"
        )
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable("ninja is not installed (`pip install ninja`); the build runs it")
    if cuda:
        home = _build.cuda_home()
        if home is None:
            raise ExtensionUnavailable(
                "CREDIT_OPS_FORCE_CUDA=1 but no CUDA toolkit was found (nvcc on PATH or $CUDA_HOME); install the "
                f"CUDA toolkit matching torch's CUDA {torch.version.cuda}, or unset CREDIT_OPS_FORCE_CUDA"
            )
        if cpp_extension.CUDA_HOME is None:  # cpp_extension was imported before CUDA_HOME was set
            cpp_extension.CUDA_HOME = home


def _compile(torch, key: dict, cuda: bool, why: str, root: str, entry: str):
    srcs = _build.sources(root, cuda)
    args = _build.compile_args(torch, cuda)
    path = os.environ.get("PATH", "")
    bindir = os.path.dirname(sys.executable)  # pip's ninja lives there; a venv's python may run with it off PATH
    env = {**_build.build_env(cuda), "PATH": path if bindir in path.split(os.pathsep) else bindir + os.pathsep + path}
    with _env(env):
        from torch.utils import cpp_extension  # reads CUDA_HOME on first import

        _check_toolchain(torch, cuda)
    if os.path.isdir(entry):
        _say(f"the cache entry {entry} is incomplete or was built for another key: rebuilding it")
    kind = "C++ and CUDA kernels" if cuda else f"C++ CPU kernels only: {why}"
    _say(
        f"compiling the C++ extension credit_ops._C for torch {key['torch']} ({kind}) into {entry}; once per torch "
        f"version, {'several minutes' if cuda else 'about a minute'} ..."
    )
    # A build killed midway may leave torch's own lock file (older torch: a file whose existence blocks) and
    # partial outputs; we hold the entry's lock, so nothing else is building here: start clean.
    shutil.rmtree(entry, ignore_errors=True)
    os.makedirs(entry)
    t0, stop = time.monotonic(), threading.Event()
    watcher = threading.Thread(target=_progress, args=(entry, len(srcs), stop, t0), daemon=True)
    watcher.start()
    try:
        with _env(env):
            module = cpp_extension.load(
                name="_C",
                sources=srcs,
                extra_cflags=_build.JIT_CXX + args["cxx"],
                extra_cuda_cflags=args["nvcc"] or None,
                extra_ldflags=args["ldflags"],
                extra_include_paths=[root, *args["include_dirs"]],
                build_directory=entry,
                with_cuda=cuda,
                verbose=False,
            )
    except ExtensionUnavailable:
        raise
    except Exception as e:  # noqa: BLE001  (a compile error, a missing header, ...: keep the compiler's words)
        log = os.path.join(entry, "build.log")
        text = str(e)
        with contextlib.suppress(OSError), open(log, "w") as f:
            f.write(text)
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise ExtensionUnavailable(f"compiling credit_ops._C failed (full output: {log}):\n{tail}") from e
    finally:
        stop.set()
        watcher.join()
    with open(os.path.join(entry, RECORD), "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    _say(f"built credit_ops._C in {time.monotonic() - t0:.0f} s")
    sys.modules[_build.EXT_NAME] = module
    return module


def load_extension(*, force: bool = False):
    """Load (building if needed) credit_ops._C for the running torch; see the module docstring. Returns the module,
    or raises ExtensionUnavailable."""
    import torch

    root = _build.source_root()
    force = force or _build.flag("CREDIT_OPS_REBUILD")
    if root is None:
        # No sources to hash or build (a stripped install): the installed _C is all there is.
        try:
            module = importlib.import_module(_build.EXT_NAME)
        except ImportError as e:
            raise ExtensionUnavailable(f"credit_ops._C is not built and its C++ sources are not installed ({e})") from e
        info.update(origin="installed", path=getattr(module, "__file__", None))
        return module

    cuda, why = _build.want_cuda(torch)
    key = _build.build_key(torch, cuda, root)
    info["key"] = key
    if not force:
        module = _installed(key, checkout=os.path.basename(root) != "_csrc")
        if module is not None:
            return module
    entry = os.path.join(cache_root(), _build.cache_dirname(key))
    info["path"] = os.path.join(entry, "_C.so")
    for reason in info["skipped"]:
        _say(f"not loading {reason}; using the cache")
    so = None if force else cached_entry(entry, key)
    if so is None:
        with contextlib.ExitStack() as stack:
            try:
                os.makedirs(os.path.dirname(entry), exist_ok=True)
                stack.enter_context(_lock(entry + ".lock", entry))
            except OSError as e:
                raise ExtensionUnavailable(
                    f"cannot write the build cache {os.path.dirname(entry)} ({e}); set "
                    "CREDIT_OPS_CACHE to a writable directory"
                ) from e
            so = None if force else cached_entry(entry, key)  # another process may have built it meanwhile
            if so is None:
                module = _compile(torch, key, cuda, why, root, entry)
                info.update(origin="cache", built=True)
                return module
    try:
        module = _import_so(so)
    except (ImportError, OSError) as e:
        raise ExtensionUnavailable(f"the cached {so} does not load ({e}); delete {os.path.dirname(so)}") from e
    info.update(origin="cache")
    return module


# ---- without _C: the schemas, defined from csrc/registration.cpp, with kernels that say what is missing
_stub_library = None

# The public ops by kernel kind (see credit_ops/_backend.py): compiled kernels only, or Triton kernels on the GPU.
COMPILED_ONLY = "align_edits (and credit_assign, which uses it), group_advantages, ibpo_shaping, token_advantages"
TRITON_OPS = "token_logprobs, policy_loss, fused_linear_logprobs, fused_linear_policy_loss"


def schemas(root: str | None = None) -> list[str]:
    """The credit:: schemas declared in csrc/registration.cpp (``m.def("..." "...")``, literals concatenated)."""
    root = root or _build.source_root()
    if root is None:
        return []
    with open(os.path.join(root, "registration.cpp")) as f:
        text = re.sub(r"//[^\n]*", "", f.read())
    body = text[text.index("TORCH_LIBRARY(credit") :]
    out = []
    for call in re.finditer(r"m\.def\(((?:\s*\"(?:[^\"\\]|\\.)*\")+)\s*\)", body):
        out.append("".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call.group(1))))
    return out


def define_stubs(reason: str) -> list[str]:
    """Define every credit:: op of _C with a kernel that raises ExtensionUnavailable(reason), so the fake kernels
    and autograd formulas still register, the Triton ops work, and a compiled op fails with a clear message.
    Returns the op names."""
    import torch

    global _stub_library
    _stub_library = torch.library.Library("credit", "DEF")
    names = []
    for schema in schemas():
        name = _stub_library.define(schema)
        names.append(name)

        def kernel(*args, _name=name, **kwargs):
            raise ExtensionUnavailable(
                f"torch.ops.credit.{_name} is a kernel of the compiled extension credit_ops._C, which is not "
                f"available: {reason}. Then run `python -m credit_ops.build`. Meanwhile CREDIT_OPS_BACKEND=reference "
                "runs every op in pure PyTorch."
            )

        # CompositeExplicitAutograd, not CPU / CUDA: "has a CUDA kernel" checks must stay false.
        _stub_library.impl(name, kernel, "CompositeExplicitAutograd")
    return names


def unavailable_message(reason: str, has_triton: bool) -> str:
    triton = (
        f"{TRITON_OPS} run through Triton on CUDA tensors (CPU tensors: TRITON_INTERPRET=1 CREDIT_OPS_BACKEND=triton)"
        if has_triton
        else "triton is not installed either, so no op runs its fast kernels"
    )
    return (
        f"the compiled extension credit_ops._C is not available ({reason}). Unavailable: {COMPILED_ONLY}, and "
        f"the C++ CPU kernels of every op. Still working: {triton}; every op under CREDIT_OPS_BACKEND=reference. "
        "To build it: fix the above, then run `python -m credit_ops.build`."
    )


def load_or_stub():
    """What credit_ops/__init__.py calls: load_extension(), or, if _C cannot be had, the stubs and one warning
    (CREDIT_OPS_REQUIRE_EXT=1: raise). Returns the _C module or None."""
    try:
        return load_extension()
    except ExtensionUnavailable as e:
        info["error"] = str(e)
        try:
            declared = schemas()
        except (OSError, ValueError):
            declared = []
        if _build.flag("CREDIT_OPS_REQUIRE_EXT") or not declared:
            raise ImportError(f"credit_ops: {e}") from e
        from credit_ops._backend import has_triton

        reason = str(e)
        define_stubs(reason.splitlines()[0])
        warnings.warn(unavailable_message(reason, has_triton()), ExtensionUnavailableWarning, stacklevel=2)
        return None
