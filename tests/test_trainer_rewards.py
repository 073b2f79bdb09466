"""Verifiers facing garbage: scorers that raise, return NaN or out-of-range values, or stall (math-verify's time
limit); empty completions and completions without an answer. None of them stops a run or passes as a reward."""

import math
import os
import warnings

import pytest
from credit_ops.trainer.rewards import Verifier
from credit_ops.trainer.tasks import ArithTask, Problem

P = Problem("3+4=", "7", ["3+4=7"])


class Faulty(ArithTask):
    """An arith task whose scorer misbehaves on chosen completions."""

    def __init__(self, outcome):
        super().__init__(2, 9)
        self.outcome = outcome

    def score(self, problem, completion):
        out = self.outcome(completion)
        if isinstance(out, Exception):
            raise out
        return out


@pytest.mark.parametrize(
    "outcome",
    [RuntimeError("scorer crashed"), math.nan, math.inf, 1.5, -0.1, None, "1"],
    ids=["raises", "nan", "inf", "above_1", "below_0", "none", "string"],
)
def test_a_faulty_scorer_scores_zero_and_is_counted(outcome):
    v = Verifier("task", Faulty(lambda c: outcome if c == "bad" else 1.0))
    with pytest.warns(UserWarning, match="scored 0"):
        assert v.batch([P, P, P], ["#7", "bad", "#7"]) == [1.0, 0.0, 1.0]
    assert v.errors == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per verifier, then only the count
        assert v(P, "bad") == 0.0
    assert v.errors == 2


@pytest.mark.parametrize("kind", ["task", "exact", "numeric", "math_verify"])
@pytest.mark.parametrize("text", ["", " ", "#", "no answer here", "<eos><pad>", "#7" * 500])
def test_garbage_completions_are_wrong_not_errors(kind, text):
    v = Verifier(kind, ArithTask(2, 9))
    assert v(P, text) in (0.0, 1.0) and v.errors == 0
    if text in ("", " ", "#", "no answer here"):
        assert v(P, text) == 0.0


def test_math_verify_gets_the_time_limit(monkeypatch):
    import math_verify

    seen = []
    real_parse, real_verify = math_verify.parse, math_verify.verify
    monkeypatch.setattr(math_verify, "parse", lambda s, **kw: seen.append(("parse", kw)) or real_parse(s, **kw))
    monkeypatch.setattr(
        math_verify, "verify", lambda g, a, **kw: seen.append(("verify", kw)) or real_verify(g, a, **kw)
    )
    assert Verifier("math_verify", ArithTask(2, 9), timeout=2)(P, "$7$") == 1.0
    assert seen == [
        ("parse", {"parsing_timeout": 2}),
        ("parse", {"parsing_timeout": 2}),
        ("verify", {"timeout_seconds": 2}),
    ]


def test_a_run_survives_a_faulty_scorer(tmp_path, monkeypatch):
    """Every third completion's scorer raises: the run completes, the faults are logged per step, and those
    completions are scored 0."""
    from credit_ops.trainer import tasks as tasks_mod
    from credit_ops.trainer.config import load_config
    from credit_ops.trainer.train import train

    from tests.test_trainer import TINY, read_metrics

    calls = {"n": 0}
    real = tasks_mod.Task.score

    def flaky(self, problem, completion):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise ValueError("flaky scorer")
        return real(self, problem, completion)

    monkeypatch.setattr(tasks_mod.Task, "score", flaky)
    args = [*TINY, f"out_dir={tmp_path}", f"warm_start.cache_dir={tmp_path / 'c'}", "steps=2", "algo=grpo"]
    with pytest.warns(UserWarning, match="flaky scorer"):
        train(load_config(args))
    rows = read_metrics(os.path.join(tmp_path, "default"))
    assert len(rows) == 2 and all(r["verifier_errors"] >= 2 for r in rows)  # 8 completions a step, 1 in 3 faulty
    assert all(math.isfinite(r["grad_norm"]) for r in rows)
