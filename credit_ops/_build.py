"""The one definition of how credit_ops._C is built: its sources, compile flags and build switches, and the key that
says which torch a build is for. Both builds use it: setup.py (at install time, when the build can import torch)
and credit_ops.build (on first import, into a cache, when it could not).

This module imports neither torch nor credit_ops at module level: setup.py loads it by file path in a build
environment that may have no torch. Functions that need torch take it as an argument.

Environment switches (read by both builds):

    CREDIT_OPS_FORCE_CUDA=1   build the CUDA sources even if the check below says no (fails loudly if impossible)
    CREDIT_OPS_SKIP_CUDA=1    never build the CUDA sources (a CPU-only _C, quick to rebuild while developing)
    TORCH_CUDA_ARCH_LIST      GPU targets, default "8.0;9.0a" (Ampere and Hopper)
    MAX_JOBS                  parallel compile jobs, default sized from cores and RAM
    CREDIT_OPS_DEBUG=1        -O0 -g
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"
EXT_NAME = "credit_ops._C"

# csrc/ relative: the C++ sources compiled into _C (always), the CUDA sources (CUDA builds), and every file the
# build reads (hashed into the key; shipped in wheels as credit_ops/_csrc). csrc/tests is the CMake unit tests'.
CPP_SOURCES = ("*.cpp", "cpu/*.cpp", "core/*.cpp")
CUDA_SOURCES = ("cuda/*.cu",)
SOURCE_FILES = ("*.cpp", "*.h", "cpu/*", "core/*", "cuda/*")


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def source_root() -> str | None:
    """The csrc/ directory this credit_ops was installed from: credit_ops/_csrc in an installed wheel, csrc/ beside
    credit_ops/ in a checkout (an editable install or the source tree on sys.path). None when absent."""
    for root in (os.path.join(PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(root, "registration.cpp")):
            return root
    return None


def _glob(root: str, patterns) -> list[str]:
    found = {p for pattern in patterns for p in glob.glob(os.path.join(root, pattern)) if os.path.isfile(p)}
    return sorted(found)


def sources(root: str, cuda: bool) -> list[str]:
    """Absolute paths of the translation units of _C."""
    files = _glob(root, CPP_SOURCES) + (_glob(root, CUDA_SOURCES) if cuda else [])
    # torch's JIT build names each object after its file's basename: two sources with one basename would collide.
    stems = [os.path.basename(f).replace(".cu", ".cuda") for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise RuntimeError(f"csrc/: source files share a basename ({sorted(dup)}); the JIT build needs them unique")
    return files


def source_hash(root: str) -> str:
    """sha256 over the relative paths and contents of every file the build reads."""
    h = hashlib.sha256()
    for path in _glob(root, SOURCE_FILES):
        h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else the directory above the nvcc on PATH
    (torch looks at PATH first, and the first nvcc on PATH can be a wrapper script)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def toolkit_version(home: str) -> str | None:
    """The toolkit's version ("13.0"): its version.json, its directory's name (cuda-13.0), or nvcc --version."""
    try:
        with open(os.path.join(home, "version.json")) as f:
            return ".".join(json.load(f)["cuda"]["version"].split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    m = re.search(r"cuda-(\d+\.\d+)$", os.path.realpath(home))
    if m:
        return m.group(1)
    try:
        out = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def default_max_jobs() -> str:
    # nvcc takes ~2-3 GB per job on the heavier files: size by RAM as well as cores.
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(ram_gb // 3))))


def build_env(cuda: bool) -> dict:
    """Environment variables torch.utils.cpp_extension reads, with our defaults for those not set."""
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS") or default_max_jobs()}
    home = cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        env["CUDA_HOME"] = home
    if cuda:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list()
    return env


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def want_cuda(torch) -> tuple[bool, str]:
    """(build the CUDA sources?, why not / which toolkit) for this torch."""
    if flag("CREDIT_OPS_SKIP_CUDA"):
        return False, "CREDIT_OPS_SKIP_CUDA=1"
    if flag("CREDIT_OPS_FORCE_CUDA"):
        return True, "CREDIT_OPS_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = cuda_home()
    if home is None:
        return False, "no CUDA toolkit found (nvcc, $CUDA_HOME)"
    version = toolkit_version(home)
    if version and version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, f"the CUDA toolkit at {home} is {version}, torch's CUDA is {torch.version.cuda}"
    return True, f"CUDA toolkit {version or '?'} at {home}"


# setup.py's compiles also get Python's CFLAGS (sysconfig: -DNDEBUG -fwrapv, with -g -Wall); the JIT build does not.
JIT_CXX = ["-DNDEBUG", "-fwrapv"]


def compile_args(torch, cuda: bool) -> dict:
    """Compiler flags and paths, the same for setup.py's extension and the JIT build (root-independent)."""
    opt = ["-O0", "-g"] if flag("CREDIT_OPS_DEBUG") else ["-O3"]
    args = {"cxx": [*opt, "-fopenmp", "-Wno-psabi"], "nvcc": [], "ldflags": ["-fopenmp"], "include_dirs": []}
    if cuda:
        args["nvcc"] = [*opt, "--expt-relaxed-constexpr", "-lineinfo"]
        # Headers the system toolkit may lack (cusparse.h, ...) ship with torch's pip CUDA packages.
        nvidia = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia")
        args["include_dirs"] = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(nvidia, "cu*", "include")))
    return args


def build_key(torch, cuda: bool, root: str) -> dict:
    """What a build of _C depends on. ``torch``, ``python`` and ``sources`` decide whether a built _C can be loaded
    (compatible()); the whole key names a cache entry of the JIT build."""
    args = compile_args(torch, cuda)
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "cuda": bool(cuda),
        "arch_list": arch_list() if cuda else None,
        "flags": {"jit_cxx": JIT_CXX, **{k: v for k, v in args.items() if k != "include_dirs"}},
        "sources": source_hash(root),
    }


def compatible(recorded: dict, current: dict) -> tuple[str | None, str | None]:
    """(None, None) if a _C built with key ``recorded`` can run here; else ("abi", why): built for another torch or
    Python, it must not be loaded; or ("sources", why): it can be loaded, but was built from other sources."""
    if recorded.get("torch") != current["torch"]:
        return "abi", f"built for torch {recorded.get('torch')}, this is torch {current['torch']}"
    if recorded.get("python") != current["python"]:
        return "abi", f"built for Python {recorded.get('python')}, this is {current['python']}"
    if recorded.get("sources") != current["sources"]:
        return "sources", "built from other sources than csrc/ holds now"
    return None, None


def cache_dirname(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    device = f"cu{key['torch_cuda']}" if key["cuda"] else "cpu"
    tag = (key["python"] or "").strip(".").split(".")[0].split("-")[:2]
    return f"torch{key['torch']}-{device}-{'-'.join(tag)}-{digest}"


def sidecar_path(so_path: str) -> str:
    """The build record beside a built _C: credit_ops/_C.cpython-311-x86_64-linux-gnu.so ->
    credit_ops/_C.cpython-311-x86_64-linux-gnu.build.json."""
    return os.path.splitext(so_path)[0] + ".build.json"


def write_sidecar(so_path: str, key: dict) -> None:
    with open(sidecar_path(so_path), "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
        f.write("\n")


def read_sidecar(so_path: str) -> dict | None:
    try:
        with open(sidecar_path(so_path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
