"""The Python layer's shape: one module per op family, no import cycle, the oracle off the fast path, one backend
rule."""

import ast
import importlib
import pathlib

import pytest
import torch

import credit_ops
from credit_ops import reference

PACKAGE = pathlib.Path(credit_ops.__file__).parent
FAMILIES = ("token_logprobs", "align_edits", "advantages", "policy_loss", "fused_linear", "credit_assign")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the credit_ops modules it imports at module level (lazy imports inside functions excluded)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("credit_ops"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("credit_ops"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycle():
    graph = _imports()
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            if d != "credit_ops":  # every submodule's import runs the package __init__ first, by design
                visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_reference_imports_nothing_of_the_fast_path():
    assert _imports()["credit_ops.reference"] == set()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_modules_are_not_shadowed(family):
    module = importlib.import_module(f"credit_ops.ops.{family}")
    assert isinstance(module, type(importlib)), f"credit_ops.ops.{family} is shadowed by {module!r}"
    assert getattr(credit_ops.ops, family) is module


def test_production_never_calls_the_oracle():
    """The fast paths may read reference's tables (the specification's names and defaults) but run its code only
    on the "reference" backend: every call sits in the body of an ``if`` that tests for it."""
    tables = {name for name in dir(reference) if name.isupper()}  # the constants: names, defaults

    def calls(node, guarded):
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            on_reference = "== 'reference'" in test or "not _native(" in test
            yield from calls(node.test, guarded)
            for child in node.body:
                yield from calls(child, guarded or on_reference)
            for child in node.orelse:
                yield from calls(child, guarded)
            return
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "reference":
            yield node, guarded
        for child in ast.iter_child_nodes(node):
            yield from calls(child, guarded)

    for path in [*(PACKAGE / "ops").glob("*.py"), *PACKAGE.glob("_*.py")]:
        for node, guarded in calls(ast.parse(path.read_text()), False):
            assert node.attr in tables or guarded, f"{path.name}:{node.lineno} runs reference.{node.attr}"


@pytest.mark.parametrize("backend", ["auto", "native", "triton"])
def test_ops_without_triton_kernels_run_their_compiled_kernels(backend):
    """The one backend rule: under every backend but "reference", an op without Triton kernels runs its compiled
    kernels (the same bits as "native")."""
    a = torch.randint(0, 5, (3, 9))
    b = torch.randint(0, 5, (3, 7))
    rewards = torch.rand(6)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    with credit_ops.use_backend("native"):
        want = credit_ops.align_edits(a, None, b, None), credit_ops.group_advantages(rewards, groups)
        steps = credit_ops.segment_steps(a, None, [3])
    with credit_ops.use_backend(backend):
        got = credit_ops.align_edits(a, None, b, None), credit_ops.group_advantages(rewards, groups)
        assert torch.equal(credit_ops.segment_steps(a, None, [3]), steps)
    for x, y in zip(got[0], want[0], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(got[1], want[1])


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with credit_ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        credit_ops.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]))
