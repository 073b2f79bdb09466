"""Installing credit-ops the way users do: plain `pip install -e .` / `pip install .` (pip's isolated build, which
has no torch) into a fresh environment that has torch, then the first import compiles credit_ops._C against that
torch into a cache. Also: a _C or cache entry built for another torch is rebuilt, not loaded; concurrent first
imports build once; without a compiler the package still imports and says what is missing.

The fresh environment gets, without downloading one, a torch other than the running one if a local wheel is there
(pip's find-links; e.g. the CPU build of torch 2.13 on the CI machines), else the running torch through a .pth file.
CREDIT_OPS_INSTALL_TEST_TORCH=this forces the latter, =<requirement> picks a local wheel. The builds are CPU-only
(CREDIT_OPS_SKIP_CUDA=1). About 4-6 minutes on 2 cores; CREDIT_OPS_SKIP_INSTALL_TESTS=1 skips the slow ones
outside CI.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import credit_ops
from credit_ops import _build, _extension

REPO = Path(__file__).resolve().parents[1]
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def slow_install(test):
    """The tests that install into a fresh environment and compile (minutes): slow, skippable outside CI."""
    skip = os.environ.get("CREDIT_OPS_SKIP_INSTALL_TESTS") == "1" and not os.environ.get("CI")
    test = pytest.mark.skipif(skip, reason="CREDIT_OPS_SKIP_INSTALL_TESTS=1 (CI runs them)")(test)
    return pytest.mark.slow(pytest.mark.install(test))


# One op of each family, on CPU, through the compiled kernels; prints what the loader did.
SMOKE = r"""
import json, torch
import credit_ops
from credit_ops._extension import info
torch.manual_seed(0)
B, T, V, H = 2, 5, 17, 8
labels = torch.randint(0, V, (B, T))
logits = torch.randn(B, T, V, requires_grad=True)
credit_ops.token_logprobs(logits, labels).sum().backward()
a, b = torch.randint(0, 9, (3, 6)), torch.randint(0, 9, (3, 7))
edits = credit_ops.align_edits(a, torch.tensor([6, 4, 0]), b, torch.tensor([7, 7, 3]))
adv = credit_ops.group_advantages(torch.randn(6), torch.tensor([0, 0, 0, 1, 1, 1]))
loss, stats = credit_ops.policy_loss(torch.randn(B, T, V, requires_grad=True), labels, torch.randn(B))
loss.backward()
hidden, weight = torch.randn(B * T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
head_loss, _ = credit_ops.fused_linear_policy_loss(hidden, weight, labels.reshape(-1), torch.randn(B * T))
head_loss.backward()
assert logits.grad is not None and weight.grad is not None and torch.isfinite(adv).all()
print("SMOKE " + json.dumps({**{k: info[k] for k in ("origin", "path", "built", "skipped")},
                             "file": credit_ops.__file__, "torch": torch.__version__}))
"""


def _run(cmd, *, env=None, timeout=900, cwd=None, check=True):
    t0 = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    r.wall = time.monotonic() - t0
    if check and r.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
            f"--- stderr\n{r.stderr[-6000:]}"
        )
    return r


def _smoke_result(r) -> dict:
    lines = [line for line in r.stdout.splitlines() if line.startswith("SMOKE ")]
    assert lines, f"no result\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    return json.loads(lines[-1][len("SMOKE ") :])


def _copy_checkout(dst: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files (no .venv, build/, in-place _C)."""
    try:
        names = (
            subprocess.run(
                ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".*cache*")
        shutil.copytree(REPO, dst, ignore=ignore)
        return
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


class Env:
    """A fresh virtual environment with torch, and a copy of the checkout to install from."""

    def __init__(self, root: Path):
        self.root, self.src = root, root / "src"
        self.src.mkdir()
        _copy_checkout(self.src)
        _run([sys.executable, "-m", "venv", root / "venv"])
        self.py = root / "venv" / "bin" / "python"
        self.site = Path(_run([self.py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
        self.smoke = root / "smoke.py"
        self.smoke.write_text(SMOKE)
        self.times = {}
        self.torch = self._provide_torch()

    def env(self, cache, **extra) -> dict:
        drop = ("CREDIT_OPS_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET", "PIP_REQUIRE_VIRTUALENV")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        return {**env, "CREDIT_OPS_CACHE": str(cache), "CREDIT_OPS_SKIP_CUDA": "1", "PIP_NO_INPUT": "1", **extra}

    def pip(self, *args, **kw):
        return _run([self.py, "-m", "pip", *args], env=self.env(self.root / "unused-cache"), cwd=self.root, **kw)

    def _provide_torch(self) -> str:
        choice = os.environ.get("CREDIT_OPS_INSTALL_TEST_TORCH", "auto")
        if choice != "this":
            # Another torch, from local files only (--no-index): never a download of several GB.
            this = torch.__version__.split("+")[0]
            req = f"torch>=2.11,!={this}" if choice == "auto" else choice
            wheels = self.root / "wheels"
            r = self.pip("download", "--no-index", "--no-deps", "--only-binary=:all:", "-d", wheels, req, check=False)
            if r.returncode == 0:
                t0 = time.monotonic()
                self.pip("install", "-q", *wheels.glob("torch-*.whl"))
                self.times["pip install torch (local wheel)"] = time.monotonic() - t0
                return _run([self.py, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
            if choice != "auto":
                pytest.fail(f"no local wheel for {req}:\n{r.stderr[-2000:]}")
        # The running torch (and its dependencies): its site-packages, visible to the new environment.
        (self.site / "_credit_ops_test_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
        return torch.__version__


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp("install"))
    yield env
    print("\ninstall test timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in env.times.items()), file=sys.stderr)


@slow_install
def test_editable_install_compiles_on_first_import(fresh):
    cache = fresh.root / "cache-editable"
    r = fresh.pip("install", "-e", fresh.src)  # as the README says: build isolation on, torch not in it
    fresh.times["pip install -e ."] = r.wall
    installed = [line for line in r.stdout.splitlines() if line.startswith("Successfully installed")]
    assert installed and "torch" not in installed[0], f"pip installed torch:\n{r.stdout[-3000:]}"
    assert not list((fresh.src / "credit_ops").glob("_C*.so")), "the isolated build cannot have compiled _C"

    r = _run([fresh.py, fresh.smoke], env=fresh.env(cache), cwd=fresh.root)
    fresh.times["first import (compiles _C)"] = r.wall
    out = _smoke_result(r)
    assert out["torch"] == fresh.torch
    assert Path(out["file"]).is_relative_to(fresh.src), out  # the editable install runs the checkout
    assert out["origin"] == "cache" and out["built"], out
    assert Path(out["path"]).is_relative_to(cache), out
    assert "compiling the C++ extension credit_ops._C for torch " + fresh.torch in r.stderr, r.stderr[-3000:]

    r = _run([fresh.py, fresh.smoke], env=fresh.env(cache), cwd=fresh.root)
    fresh.times["second import"] = r.wall
    again = _smoke_result(r)
    assert again["origin"] == "cache" and not again["built"] and again["path"] == out["path"], again
    assert "compiling" not in r.stderr, r.stderr[-3000:]

    r = _run([fresh.py, "-m", "credit_ops.build"], env=fresh.env(cache), cwd=fresh.root)
    assert out["path"] in r.stdout and "for torch " + fresh.torch in r.stdout, r.stdout


@slow_install
def test_wheel_install_rebuilds_stale_builds_once(fresh):
    """`pip install .` (a wheel, without _C: the sources ship in it) beside a _C built for another torch and a cache
    entry recorded for another torch: neither is loaded; two processes importing at once compile one _C."""
    cache = fresh.root / "cache-wheel"
    fresh.pip("uninstall", "-y", "credit-ops")
    r = fresh.pip("install", fresh.src)
    fresh.times["pip install ."] = r.wall
    pkg = fresh.site / "credit_ops"
    assert (pkg / "_csrc" / "registration.cpp").is_file() and (pkg / "_csrc" / "cpu").is_dir()
    assert not list(pkg.glob("_C*.so"))

    # A _C for another torch in the package, as after upgrading torch under a `pip install --no-build-isolation`
    # build: the real binary of the running environment if it is another torch's, else a file that cannot load.
    stale_so = pkg / f"_C{SUFFIX}"
    this_so = getattr(credit_ops._C, "__file__", None)
    if this_so and fresh.torch != torch.__version__:
        shutil.copy2(this_so, stale_so)
    else:
        stale_so.write_bytes(b"not a shared object")
    _build.write_sidecar(str(stale_so), {"torch": "2.11.0+stale", "python": SUFFIX, "sources": "stale"})

    # A complete-looking cache entry at this key's directory, recorded for another torch, with a _C that cannot load.
    key_script = (
        "import importlib.util, json, os, torch\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(pkg / '_build.py')!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        "key = b.build_key(torch, False, b.source_root())\n"
        "print(json.dumps([b.cache_dirname(key), key]))\n"
    )
    dirname, key = json.loads(_run([fresh.py, "-c", key_script], env=fresh.env(cache)).stdout.splitlines()[-1])
    entry = cache / dirname
    entry.mkdir(parents=True)
    (entry / "_C.so").write_bytes(b"not a shared object")
    (entry / _extension.RECORD).write_text(json.dumps({**key, "torch": "2.11.0"}))

    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [str(fresh.py), str(fresh.smoke)],
            env=fresh.env(cache),
            cwd=fresh.root,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    fresh.times["two concurrent first imports"] = time.monotonic() - t0
    for r in results:
        assert r.returncode == 0, f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    outs = [_smoke_result(r) for r in results]
    for out, r in zip(outs, results, strict=True):
        assert Path(out["file"]).is_relative_to(fresh.site), out  # the installed wheel, not the checkout
        assert out["origin"] == "cache" and out["path"] == str(entry / "_C.so"), out
        assert any("built for torch 2.11.0+stale" in s for s in out["skipped"]), out
        assert f"not loading {stale_so}: built for torch 2.11.0+stale" in r.stderr, r.stderr[-3000:]
    builders = [r for r in results if "compiling the C++ extension" in r.stderr]
    assert len(builders) == 1, [r.stderr[-2000:] for r in results]
    assert "was built for another key: rebuilding it" in builders[0].stderr
    assert sum(out["built"] for out in outs) == 1
    waiter = next(r for r in results if r is not builders[0])
    assert "waiting for another process" in waiter.stderr or "compiling" not in waiter.stderr
    assert json.loads((entry / _extension.RECORD).read_text()) == key


def test_cache_entry_recorded_for_another_key_is_not_used(tmp_path):
    key = _build.build_key(torch, False, _build.source_root())
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "_C.so").write_bytes(b"")
    assert _extension.cached_entry(str(entry), key) is None  # no record: incomplete
    (entry / _extension.RECORD).write_text(json.dumps({**key, "torch": "2.11.0"}))
    assert _extension.cached_entry(str(entry), key) is None
    (entry / _extension.RECORD).write_text(json.dumps(key))
    assert _extension.cached_entry(str(entry), key) == str(entry / "_C.so")
    assert _build.cache_dirname(key) != _build.cache_dirname({**key, "torch": "2.11.0"})


def test_build_record_decides_what_loads():
    key = _build.build_key(torch, False, _build.source_root())
    assert _build.compatible(dict(key), key) == (None, None)
    assert _build.compatible({**key, "torch": "2.11.0"}, key)[0] == "abi"
    assert _build.compatible({**key, "python": ".cpython-312-x86_64-linux-gnu.so"}, key)[0] == "abi"
    assert _build.compatible({**key, "sources": "0"}, key)[0] == "sources"


def test_in_place_build_records_its_torch():
    """`make build` / `pip install --no-build-isolation` (setup.py) write the record the import checks."""
    so = getattr(credit_ops._C, "__file__", None)
    if _extension.info["origin"] != "installed" or not so:
        pytest.skip(f"credit_ops._C was not built in place here ({_extension.info['origin']})")
    recorded = _build.read_sidecar(so)
    assert recorded is not None, f"no build record beside {so}: rebuild with `make build`"
    assert recorded["torch"] == torch.__version__ and recorded["python"] == SUFFIX


def test_schemas_parsed_from_registration_match_the_extension():
    """Without _C, the ops are defined from csrc/registration.cpp's schemas: they must be the registered ones."""
    if credit_ops._C is None:
        pytest.skip("no compiled extension here")
    parsed = _extension.schemas()
    assert len(parsed) >= 10
    for schema in parsed:
        op = getattr(torch.ops.credit, schema.split("(")[0]).default
        assert str(torch._C.parse_schema("credit::" + schema)) == str(op._schema)


NO_COMPILER = r"""
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import credit_ops
from credit_ops._extension import ExtensionUnavailable
assert credit_ops._C is None
msg = [str(w.message) for w in caught if w.category.__name__ == "ExtensionUnavailableWarning"]
assert len(msg) == 1, [str(w.message) for w in caught]
assert "no C++ compiler" in msg[0] and "align_edits" in msg[0] and "token_logprobs" in msg[0], msg[0]
x, y = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
with credit_ops.use_backend("triton"):  # the Triton kernels, through the interpreter on CPU
    lp = credit_ops.token_logprobs(x, y)
with credit_ops.use_backend("reference"):
    torch.testing.assert_close(lp, credit_ops.token_logprobs(x, y))
    credit_ops.group_advantages(torch.randn(4), torch.tensor([0, 0, 1, 1]))
    # the policy losses' bookkeeping takes its tensor-op path there (its CPU ops are _C's)
    credit_ops.policy_loss(x.requires_grad_(True), y, torch.randn(2))[0].backward()
    credit_ops.policy_loss_from_logprobs(-torch.rand(2, 3), torch.randn(2), mask=torch.ones(2, 3))
    credit_ops.fused_linear_policy_loss(torch.randn(6, 4), torch.randn(11, 4), y, torch.randn(2))
try:
    credit_ops.group_advantages(torch.randn(4), torch.tensor([0, 0, 1, 1]))
except ExtensionUnavailable as e:
    assert "torch.ops.credit.group_advantages" in str(e) and "no C++ compiler" in str(e), e
else:
    raise AssertionError("the compiled op ran without _C")
print("NO_COMPILER OK")
"""


@pytest.mark.install
def test_without_a_compiler_the_triton_ops_still_import_and_run(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDIT_OPS_")}
    env.update(
        CREDIT_OPS_REBUILD="1", CREDIT_OPS_CACHE=str(tmp_path), CXX=str(tmp_path / "no-such-c++"), TRITON_INTERPRET="1"
    )
    r = _run([sys.executable, "-c", NO_COMPILER], env=env, timeout=600, cwd=tmp_path)
    assert "NO_COMPILER OK" in r.stdout
    assert not list(tmp_path.glob("*/_C.so"))
