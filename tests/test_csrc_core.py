"""The framework-free C++ tests of csrc/tests (the alignment core, and the CUDA kernels of align_edits and of the
Hopper policy-loss rows run on CPU threads by emulation), compiled and run here so CI covers them; `make cmake`
runs the same files through ctest."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "tests").glob("test_*.cpp"))
CXX = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_csrc(src, tmp_path):
    exe = tmp_path / src.stem
    build = [
        CXX,
        "-std=c++20",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Wno-unknown-pragmas",
        f"-I{ROOT / 'csrc'}",
        str(src),
        "-o",
        str(exe),
        "-pthread",
    ]
    out = subprocess.run(build, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
