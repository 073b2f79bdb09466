"""Verifiers: completion text -> reward in [0, 1]; correct means reward >= 0.5 (docs/method.md §1.1).

task         the task's own scorer (arith: exact answer; gsm8k: reasoning-gym's scorer)
exact        the extracted answer equals the reference string (whitespace-stripped)
numeric      both parse as numbers and agree to 1e-6 relative
math_verify  LaTeX-style answers through math-verify (\\frac{1}{2} == 0.5, sets, intervals, ...)
"""

import math
import warnings

from .tasks import Problem, Task, extract_answer

CORRECT = 0.5  # the verification threshold: a completion (sample or repair) is correct iff reward >= CORRECT


def is_correct(reward: float) -> bool:
    return reward >= CORRECT


def exact_match(answer: str | None, gold: str) -> float:
    return float(answer is not None and answer.strip() == gold.strip())


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace("$", "").strip())
    except (ValueError, AttributeError):
        return None


def numeric_match(answer: str | None, gold: str) -> float:
    a, b = _number(answer or ""), _number(gold)
    if a is None or b is None:
        return 0.0
    return float(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))


def math_verify_match(completion: str, gold: str, timeout: int = 5) -> float:
    """math-verify's equivalence, each of its parse and verify calls cut off after `timeout` seconds (math-verify's
    own limit: a SIGALRM in the main thread) so that a pathological expression cannot stall a step."""
    from math_verify import parse, verify

    try:
        g = parse(gold if "$" in gold or "\\" in gold else f"${gold}$", parsing_timeout=timeout)
        a = parse(completion, parsing_timeout=timeout)
        return float(bool(g) and bool(a) and verify(g, a, timeout_seconds=timeout))
    except Exception:  # math-verify raises on unparsable input; that is a wrong answer
        return 0.0


class Verifier:
    """completion -> reward in [0, 1]. A scorer that raises, or returns something that is not a finite number in
    [0, 1], scores 0 for that completion and is counted in `errors` (the trainer logs the count per step as
    `verifier_errors`, and warns once): a faulty scorer never stops a run, and never passes as a reward."""

    def __init__(self, kind: str, task: Task, timeout: int = 5):
        if kind not in ("task", "exact", "numeric", "math_verify"):
            raise ValueError(f"unknown verifier {kind!r}")
        self.kind, self.task, self.timeout = kind, task, timeout
        self.errors = 0

    def score(self, problem: Problem, completion: str) -> float:
        if self.kind == "task":
            return self.task.score(problem, completion)
        if self.kind == "exact":
            return exact_match(extract_answer(completion), problem.answer)
        if self.kind == "numeric":
            return numeric_match(extract_answer(completion), problem.answer)
        return math_verify_match(completion, problem.answer, self.timeout)

    def __call__(self, problem: Problem, completion: str) -> float:
        try:
            r = self.score(problem, completion)
            bad = None if isinstance(r, (int, float)) and math.isfinite(r) and 0 <= r <= 1 else f"returned {r!r}"
        except Exception as e:
            r, bad = 0.0, f"raised {e!r}"
        if bad is None:
            return float(r)
        if not self.errors:
            msg = f"verifier {self.kind!r} {bad} on {completion[:40]!r}; scored 0 (counted as verifier_errors)"
            warnings.warn(msg, stacklevel=2)
        self.errors += 1
        return 0.0

    def batch(self, problems: list[Problem], completions: list[str]) -> list[float]:
        return [self(p, c) for p, c in zip(problems, completions, strict=False)]
