"""align_edits / segment_steps / step_masks / truncate_regions: every backend against the reference DP,
distances against rapidfuzz, hand-worked examples of the canonical script, anchors, regions, steps, errors."""

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import credit_ops
from credit_ops import reference
from tests.conftest import backend_devices

try:
    from rapidfuzz.distance import Levenshtein
except ImportError:  # a GPU image without it: distances then come from the CPU kernel, checked against it in CI
    Levenshtein = None

ANCHORS = ("prev", "next", "none")
# The triton backend has no kernel of its own for these ops (it runs the native one).
DEVICES = [pytest.param(b, d, id=f"{b}-{d}") for b, d in backend_devices() if b != "triton"]
NATIVE = [pytest.param(d, id=d) for b, d in backend_devices() if b == "native"]
CUDA = torch.cuda.is_available()


def lev(a, b):
    if Levenshtein is not None:
        return Levenshtein.distance(a, b)
    x, lx = pack([a])
    y, ly = pack([b])
    return int(credit_ops.align_edits(x, lx, y, ly).distance[0])


def pack(seqs, pad=0, dtype=torch.int64, width=None):
    """Right-padded (P, L) tensor and lengths (P,) from lists of ids."""
    L = max([len(s) for s in seqs] + [width or 0])
    out = torch.full((len(seqs), L), pad, dtype=dtype)
    for r, s in enumerate(seqs):
        out[r, : len(s)] = torch.tensor(s, dtype=dtype)
    return out, torch.tensor([len(s) for s in seqs])


def mutate(rng, a, rate, vocab):
    b = list(a)
    for _ in range(max(0, round(len(a) * rate))):
        op, pos = rng.random(), rng.randrange(len(b) + 1)
        if op < 1 / 3 and pos < len(b):
            b.pop(pos)
        elif op < 2 / 3:
            b.insert(pos, rng.randrange(vocab))
        elif pos < len(b):
            b[pos] = rng.randrange(vocab)
    return b


def random_pairs(rng, count, max_len, vocabs=(2, 3, 8, 50, 150_000), rates=(0.0, 0.01, 0.05, 0.3, 1.0)):
    pairs = []
    for _ in range(count):
        vocab = rng.choice(vocabs)
        a = [rng.randrange(vocab) for _ in range(rng.randint(0, max_len))]
        if rng.random() < 0.85:
            b = mutate(rng, a, rng.choice(rates), vocab)
        else:  # an unrelated sequence
            b = [rng.randrange(vocab) for _ in range(rng.randint(0, max_len))]
        pairs.append((a, b))
    return pairs


def run(pairs, *, backend="native", device="cpu", insert_anchor="prev", pad_a=0, pad_b=0, dtype=torch.int64):
    a, la = pack([p[0] for p in pairs], pad_a, dtype)
    b, lb = pack([p[1] for p in pairs], pad_b, dtype)
    with credit_ops.use_backend(backend):
        out = credit_ops.align_edits(
            a.to(device), la.to(device), b.to(device), lb.to(device), insert_anchor=insert_anchor
        )
    return credit_ops.AlignEdits(*(t.cpu() for t in out))


def ref(pairs, insert_anchor="prev"):
    return run(pairs, backend="reference", insert_anchor=insert_anchor)


def assert_same(out, expected):
    for name in out._fields:
        assert torch.equal(getattr(out, name), getattr(expected, name)), name


def check_outputs(out, pairs):
    """Padding unflagged, regions exactly where masks are set, distance = rapidfuzz."""
    for r, (x, y) in enumerate(pairs):
        assert not out.mask_a[r, len(x) :].any() and not out.mask_b[r, len(y) :].any()
        assert torch.equal(out.region_a[r] >= 0, out.mask_a[r]) and torch.equal(out.region_b[r] >= 0, out.mask_b[r])
        assert int(out.distance[r]) == lev(x, y)


def check_valid_script(out, r, a, b):
    """For insert_anchor="none": the unflagged tokens of a and b match one to one in order, and the regions
    cost (substitutions + surplus deletions or insertions) exactly the distance. Any optimal script passes."""
    ma, mb = out.mask_a[r, : len(a)].tolist(), out.mask_b[r, : len(b)].tolist()
    assert [x for x, f in zip(a, ma, strict=True) if not f] == [y for y, f in zip(b, mb, strict=True) if not f]
    ra, rb = out.region_a[r, : len(a)].tolist(), out.region_b[r, : len(b)].tolist()
    regions = {*ra, *rb} - {-1}
    assert regions == set(range(len(regions)))
    cost = sum(max(ra.count(q), rb.count(q)) for q in regions)
    assert cost == int(out.distance[r]) == lev(a, b)


# ---- distance vs rapidfuzz, masks vs the reference DP


@pytest.mark.skipif(Levenshtein is None, reason="needs rapidfuzz")
@pytest.mark.parametrize("device", NATIVE)
def test_distance_matches_rapidfuzz(device):
    rng = random.Random(1)
    pairs = random_pairs(rng, 3000, 120) + random_pairs(rng, 200, 700, rates=(0.01, 0.05, 0.3))
    out = run(pairs, device=device)
    expected = torch.tensor([Levenshtein.distance(a, b) for a, b in pairs], dtype=torch.int32)
    assert torch.equal(out.distance, expected)
    # Without anchors: flagged a = deletions + substitutions, flagged b = insertions + substitutions.
    out = run(pairs[:500], device=device, insert_anchor="none")
    for r, (a, b) in enumerate(pairs[:500]):
        check_valid_script(out, r, a, b)


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("insert_anchor", ANCHORS)
def test_matches_reference(backend, device, insert_anchor):
    rng = random.Random(2)
    pairs = random_pairs(rng, 150, 60)
    out = run(pairs, backend=backend, device=device, insert_anchor=insert_anchor)
    assert_same(out, ref(pairs, insert_anchor))
    check_outputs(out, pairs)


@pytest.mark.parametrize("device", NATIVE)
def test_matches_reference_longer(device):
    """Several 64-bit words per row, banded passes and the sparse pattern table (150k vocabulary)."""
    rng = random.Random(3)
    pairs = random_pairs(rng, 16, 400, vocabs=(2, 4, 150_000), rates=(0.02, 0.1, 0.4))
    assert_same(run(pairs, device=device), ref(pairs))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    vocab=st.sampled_from([2, 3, 5, 16, 1000, 150_000]),
    n=st.integers(0, 70),
    rate=st.sampled_from([0.0, 0.02, 0.1, 0.3, 0.7]),
    anchor=st.sampled_from(ANCHORS),
    dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_fuzz_against_reference(data, vocab, n, rate, anchor, dtype):
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    pairs = []
    for _ in range(3):
        a = [rng.randrange(vocab) for _ in range(rng.randint(0, n))]
        pairs.append((a, mutate(rng, a, rate, vocab)))
    pad = data.draw(st.integers(0, min(vocab, 5) - 1))  # padding ids that also occur as real ids
    expected = ref(pairs, anchor)
    for device in [p.values[0] for p in NATIVE]:
        out = run(pairs, device=device, insert_anchor=anchor, pad_a=pad, pad_b=pad, dtype=dtype)
        assert_same(out, expected)
    check_outputs(expected, pairs)


# ---- hand-worked examples of the canonical script, anchors and regions

# (a, b, anchor) -> mask_a, region_a, mask_b, region_b, distance
HAND = [
    # a deletion inside: trim prefix [1] and suffix [3], the core is one deletion
    ([1, 2, 3], [1, 3], "prev", [0, 1, 0], [-1, 0, -1], [0, 0], [-1, -1], 1),
    # trimming first: the deleted 1 is the second one
    ([1, 1], [1], "prev", [0, 1], [-1, 0], [0], [-1], 1),
    # diagonal first: two substitutions (not delete + insert), one region
    ([1, 2], [2, 1], "prev", [1, 1], [0, 0], [1, 1], [0, 0], 2),
    # deletion preferred over insertion when walking back: a[2] is deleted, 2 matched, a[0] deleted
    ([1, 2, 1], [2], "prev", [1, 0, 1], [0, -1, 1], [0], [-1], 2),
    # insertions between a[0] and a[1] under each anchor rule
    ([5, 6, 7], [5, 9, 9, 6, 7], "prev", [1, 0, 0], [0, -1, -1], [0, 1, 1, 0, 0], [-1, 0, 0, -1, -1], 2),
    ([5, 6, 7], [5, 9, 9, 6, 7], "next", [0, 1, 0], [-1, 0, -1], [0, 1, 1, 0, 0], [-1, 0, 0, -1, -1], 2),
    ([5, 6, 7], [5, 9, 9, 6, 7], "none", [0, 0, 0], [-1, -1, -1], [0, 1, 1, 0, 0], [-1, 0, 0, -1, -1], 2),
    # insertion before a[0] and after the end: "prev" / "next" fall back to the nearest token
    ([6, 7], [9, 6, 7], "prev", [1, 0], [0, -1], [1, 0, 0], [0, -1, -1], 1),
    ([6, 7], [9, 6, 7], "next", [1, 0], [0, -1], [1, 0, 0], [0, -1, -1], 1),
    ([6, 7], [6, 7, 9], "prev", [0, 1], [-1, 0], [0, 0, 1], [-1, -1, 0], 1),
    ([6, 7], [6, 7, 9], "next", [0, 1], [-1, 0], [0, 0, 1], [-1, -1, 0], 1),
    # a matched token anchoring two runs keeps the first region
    ([4], [1, 4, 2], "prev", [1], [0], [1, 0, 1], [0, -1, 1], 2),
    ([4], [1, 4, 2], "next", [1], [0], [1, 0, 1], [0, -1, 1], 2),
    # a substitution next to an insertion is one run; walking back takes the diagonal first, so the script
    # is "insert 8, substitute 2 -> 9" and the insertion's anchor a[0] joins the run
    ([1, 2, 3, 4], [1, 8, 9, 3, 4], "prev", [1, 1, 0, 0], [0, 0, -1, -1], [0, 1, 1, 0, 0], [-1, 0, 0, -1, -1], 2),
    ([1, 2, 3, 4], [1, 8, 9, 3, 4], "next", [0, 1, 0, 0], [-1, 0, -1, -1], [0, 1, 1, 0, 0], [-1, 0, 0, -1, -1], 2),
    # two separate runs numbered in order, shared by a and b
    (
        [1, 2, 3, 4, 5],
        [1, 9, 3, 4, 8],
        "prev",
        [0, 1, 0, 0, 1],
        [-1, 0, -1, -1, 1],
        [0, 1, 0, 0, 1],
        [-1, 0, -1, -1, 1],
        2,
    ),
    # empty sides, identical, nothing in common, single tokens
    ([], [], "prev", [], [], [], [], 0),
    ([], [3, 4], "prev", [], [], [1, 1], [0, 0], 2),
    ([3, 4], [], "prev", [1, 1], [0, 0], [], [], 2),
    ([3, 4, 5], [3, 4, 5], "prev", [0, 0, 0], [-1, -1, -1], [0, 0, 0], [-1, -1, -1], 0),
    ([1, 2, 3], [4, 5], "prev", [1, 1, 1], [0, 0, 0], [1, 1], [0, 0], 3),
    ([7], [7], "prev", [0], [-1], [0], [-1], 0),
    ([7], [8], "prev", [1], [0], [1], [0], 1),
    ([7], [], "next", [1], [0], [], [], 1),
    ([], [8], "next", [], [], [1], [0], 1),
]


HAND_IDS = [
    "deletion_inside",
    "trim_first_duplicate_deleted",
    "swap_two_substitutions",
    "deletion_before_insertion",
    "insertions_anchor_prev",
    "insertions_anchor_next",
    "insertions_anchor_none",
    "insert_before_start_prev",
    "insert_before_start_next",
    "insert_after_end_prev",
    "insert_after_end_next",
    "match_anchors_two_runs_prev",
    "match_anchors_two_runs_next",
    "substitution_next_to_insertion_prev",
    "substitution_next_to_insertion_next",
    "two_runs_in_order",
    "both_empty",
    "a_empty",
    "b_empty",
    "identical",
    "nothing_in_common",
    "single_token_match",
    "single_token_substitution",
    "single_token_deleted",
    "single_token_inserted",
]
assert len(HAND_IDS) == len(HAND) == len(set(HAND_IDS))


@pytest.mark.parametrize("backend,device", DEVICES)
@pytest.mark.parametrize("case", HAND, ids=HAND_IDS)
def test_hand_worked(backend, device, case):
    a, b, anchor, ma, ra, mb, rb, dist = case
    out = run([(a, b)], backend=backend, device=device, insert_anchor=anchor, pad_a=a[0] if a else 0)
    n, m = len(a), len(b)
    assert out.mask_a[0, :n].tolist() == [bool(x) for x in ma]
    assert out.region_a[0, :n].tolist() == ra
    assert out.mask_b[0, :m].tolist() == [bool(x) for x in mb]
    assert out.region_b[0, :m].tolist() == rb
    assert int(out.distance[0]) == dist


@pytest.mark.parametrize("device", NATIVE)
def test_batch_mixes_cases_and_padding(device):
    """Pairs of very different lengths in one batch, padded with ids that occur in the sequences."""
    rng = random.Random(4)
    pairs = [c[:2] for c in HAND] + random_pairs(rng, 40, 90)
    for pad in (0, 1, 7):
        out = run(pairs, device=device, pad_a=pad, pad_b=pad)
        assert_same(out, ref(pairs))
    # a wider padded width than any length
    a, la = pack([p[0] for p in pairs], width=130)
    b, lb = pack([p[1] for p in pairs], width=100)
    out = credit_ops.align_edits(a.to(device), la.to(device), b.to(device), lb.to(device))
    expected = ref(pairs)
    assert torch.equal(out.distance.cpu(), expected.distance)
    assert torch.equal(out.mask_a.cpu()[:, : expected.mask_a.shape[1]], expected.mask_a)
    assert not out.mask_a.cpu()[:, expected.mask_a.shape[1] :].any()


@pytest.mark.parametrize("device", NATIVE)
def test_int32_int64_and_lengths_none(device):
    rng = random.Random(5)
    a = [rng.randrange(30) for _ in range(50)]
    b = mutate(rng, a, 0.2, 30)
    x, y = torch.tensor([a], device=device), torch.tensor([b], device=device)
    full = credit_ops.align_edits(x, None, y, None)
    assert_same(credit_ops.AlignEdits(*(t.cpu() for t in full)), ref([(a, b)]))
    for xa, yb in ((x.int(), y.int()), (x.int(), y), (x, y.int())):
        out = credit_ops.align_edits(xa, None, yb, None)
        assert all(torch.equal(u, v) for u, v in zip(out, full, strict=True))


def distinct_tokens(rng, n):
    return rng.sample(range(1, 10 * n), n)


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("n", [32_768])
def test_long_pair_few_edits(device, n):
    """32k tokens with a handful of edits: with all tokens distinct the alignment is unique, so the masks
    are known exactly (and the distance is checked against rapidfuzz)."""
    rng = random.Random(6)
    a = distinct_tokens(rng, n)
    fresh = iter(range(20 * n, 21 * n))
    b, exp_a, exp_b = [], [False] * n, []
    subs, dels, ins = {1000, 20_000, n - 1}, {5, 15_000}, {7000, 30_000}
    for t, x in enumerate(a):
        if t in ins:  # an insertion before a[t]: anchored to a[t - 1] ("prev")
            b.append(next(fresh))
            exp_b.append(True)
            exp_a[t - 1] = True
        if t in dels:
            exp_a[t] = True
            continue
        if t in subs:
            b.append(next(fresh))
            exp_b.append(True)
            exp_a[t] = True
            continue
        b.append(x)
        exp_b.append(False)
    out = run([(a, b)], device=device)
    assert int(out.distance[0]) == lev(a, b) == len(subs) + len(dels) + len(ins)
    assert out.mask_a[0].tolist() == exp_a
    assert out.mask_b[0, : len(b)].tolist() == exp_b
    regions = out.region_a[0][out.mask_a[0]].tolist()
    assert regions == sorted(regions) and regions[-1] == len(subs) + len(dels) + len(ins) - 1


@pytest.mark.parametrize("device", NATIVE)
def test_long_pair_many_edits_distance(device):
    """Long pairs whose traceback bits exceed one band: distance vs rapidfuzz, flags consistent."""
    rng = random.Random(7)
    pairs = []
    for vocab, rate in ((4, 0.3), (150_000, 0.05)):
        a = [rng.randrange(vocab) for _ in range(3000)]
        pairs.append((a, mutate(rng, a, rate, vocab)))
    out = run(pairs, device=device, insert_anchor="none")
    for r, (a, b) in enumerate(pairs):
        check_valid_script(out, r, a, b)


@pytest.mark.parametrize("device", NATIVE)
def test_long_pair_many_edits_checkpointed(device):
    """20k x 20k with 40% edits: the traceback bits exceed the CPU core's per-pair budget, so it recomputes
    row blocks from checkpoints (the C++ core tests compare that path bit for bit with the stored one)."""
    rng = random.Random(8)
    a = [rng.randrange(4) for _ in range(20_000)]
    b = mutate(rng, a, 0.4, 4)
    out = run([(a, b)], device=device, insert_anchor="none")
    check_valid_script(out, 0, a, b)


@pytest.mark.parametrize("device", NATIVE)
def test_worst_case_32k_two_token_vocabulary(device):
    """The worst case for the traceback: 32k x 32k tokens over a 2-token vocabulary, independent strings (edits
    everywhere, ties everywhere), and lengths that differ: a valid minimal edit script, distance equal to
    rapidfuzz's."""
    rng = random.Random(9)
    a = [rng.randrange(2) for _ in range(32_768)]
    b = [rng.randrange(2) for _ in range(32_000)]
    out = run([(a, b)], device=device, insert_anchor="none")
    check_valid_script(out, 0, a, b)


MEMORY_PROBE = """
import random, resource, sys, torch, credit_ops
from tests.test_align_edits import mutate
rng = random.Random(10)
vocab = int(sys.argv[1])
a = [rng.randrange(vocab) for _ in range(32_768)]
b = mutate(rng, a, 0.3, vocab)
A, B, la, lb = torch.tensor([a]), torch.tensor([b]), torch.tensor([len(a)]), torch.tensor([len(b)])
credit_ops.align_edits(A[:, :8], torch.tensor([8]), B[:, :8], torch.tensor([8]))  # allocator and thread pool up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = credit_ops.align_edits(A, la, B, lb)
print(int(out.distance), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("vocab", [2, 150_000])
def test_memory_bound_32k_30_percent_edits(vocab):
    """32k tokens with 30% edits stay within the documented bound (README: at most 48 MiB per pair in flight —
    32 MiB of traceback bits, then checkpointed row blocks). Peak RSS of a fresh process, so earlier tests'
    allocations cannot hide the growth; the distance is rapidfuzz's."""
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(vocab)], capture_output=True, text=True, env=env, cwd=root
    )
    assert out.returncode == 0, out.stderr[-2000:]
    distance, grown = map(int, out.stdout.split())
    rng = random.Random(10)
    a = [rng.randrange(vocab) for _ in range(32_768)]
    assert distance == lev(a, mutate(rng, a, 0.3, vocab))
    assert grown <= 48 << 20, f"align_edits grew the peak RSS by {grown / 2**20:.1f} MiB for one 32k pair"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_matches_cpu_batches():
    rng = random.Random(9)
    pairs = random_pairs(rng, 1024, 300, rates=(0.01, 0.05, 0.3))
    assert_same(run(pairs, device="cuda"), run(pairs))
    pairs = random_pairs(rng, 8, 5000, vocabs=(3, 150_000), rates=(0.02, 0.3))
    assert_same(run(pairs, device="cuda"), run(pairs))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_no_host_sync():
    rng = random.Random(10)
    pairs = random_pairs(rng, 64, 200)
    a, la = pack([p[0] for p in pairs])
    b, lb = pack([p[1] for p in pairs])
    a, la, b, lb = (t.cuda() for t in (a, la, b, lb))
    previous = credit_ops.set_value_checks("async")
    try:
        torch.cuda.set_sync_debug_mode("error")
        credit_ops.align_edits(a, la, b, lb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        credit_ops.set_value_checks(previous)


def test_opcheck():
    a, la = pack([[1, 2, 3, 4], [5, 6]])
    b, lb = pack([[1, 3, 4, 9], [6, 6, 6]])
    torch.library.opcheck(torch.ops.credit.align_edits.default, (a, la, b, lb, 0))
    if CUDA:
        torch.library.opcheck(torch.ops.credit.align_edits.default, tuple(t.cuda() for t in (a, la, b, lb)) + (1,))


def test_compile():
    a, la = pack([[1, 2, 3, 4], [5, 6]])
    b, lb = pack([[1, 3, 4, 9], [6, 6, 6]])
    fn = torch.compile(lambda *x: credit_ops.align_edits(*x, insert_anchor="next"), fullgraph=True)
    eager = credit_ops.align_edits(a, la, b, lb, insert_anchor="next")
    assert all(torch.equal(u, v) for u, v in zip(fn(a, la, b, lb), eager, strict=True))


# ---- steps and truncation


@pytest.mark.parametrize("backend,device", DEVICES)
def test_segment_steps(backend, device):
    tokens = torch.tensor([[5, 0, 7, 8, 0, 9, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3, 3, 3]])
    lengths = torch.tensor([6, 3, 0])
    with credit_ops.use_backend(backend):
        one = credit_ops.segment_steps(tokens.to(device), lengths.to(device), torch.tensor([0]).to(device))
        two = credit_ops.segment_steps(tokens.to(device), lengths.to(device), [0, 8])
        none = credit_ops.segment_steps(tokens.to(device), None, torch.tensor([], dtype=torch.int64).to(device))
    assert one.dtype == torch.int32
    assert one.cpu().tolist() == [[0, 0, 1, 1, 1, 2, -1, -1], [0, 1, 2, -1, -1, -1, -1, -1], [-1] * 8]
    assert two.cpu().tolist() == [[0, 0, 1, 1, 2, 3, -1, -1], [0, 1, 2, -1, -1, -1, -1, -1], [-1] * 8]
    assert none.cpu().tolist() == [[0] * 8] * 3


@pytest.mark.parametrize("backend,device", DEVICES)
def test_step_masks(backend, device):
    steps = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1], [0, 1, 2, -1, -1, -1, -1, -1]])
    mask = torch.tensor([[0, 0, 1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with credit_ops.use_backend(backend):
        out = credit_ops.step_masks(mask.to(device), steps.to(device))
        empty = credit_ops.step_masks(torch.zeros_like(mask).to(device), steps.to(device))
    assert out.cpu().tolist() == [
        [False, False, True, True, True, False, False, False],
        [True, False, False, False, False, False, False, False],
    ]
    assert not empty.any()


@pytest.mark.parametrize("backend,device", DEVICES)
def test_truncate_regions(backend, device):
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    regions = torch.tensor([[0, 0, -1, 1, 2], [0, -1, 1, 2, -1]], dtype=torch.int32)
    with credit_ops.use_backend(backend):
        got = {
            k: credit_ops.truncate_regions(mask.to(device), regions.to(device), k).cpu().int().tolist()
            for k in (0, 1, 2, 5)
        }
        per_row = credit_ops.truncate_regions(mask.to(device), regions.to(device), torch.tensor([1, 2]).to(device))
    assert got[0] == [[0] * 5, [0] * 5]
    assert got[1] == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert got[2] == [[1, 1, 0, 1, 0], [1, 0, 1, 0, 0]]
    assert got[5] == mask.int().tolist()
    assert per_row.cpu().int().tolist() == [[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]]


def test_pipeline_alignment_to_truncated_step_masks():
    """The trainer's use: align, truncate both sides to the first region, lift to steps."""
    nl = 0
    a = [1, 2, nl, 3, 4, nl, 5, 6, nl]
    b = [1, 9, nl, 3, 4, nl, 5, 7, nl]
    out = run([(a, b)])
    assert out.region_a[0].tolist() == [-1, 0, -1, -1, -1, -1, -1, 1, -1]
    first = credit_ops.truncate_regions(out.mask_a, out.region_a, 1)
    steps = credit_ops.segment_steps(torch.tensor([a]), None, [nl])
    assert credit_ops.step_masks(first, steps)[0].int().tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert torch.equal(
        credit_ops.truncate_regions(out.mask_b, out.region_b, 1)[0].nonzero().flatten(), torch.tensor([1])
    )


def test_steps_ops_random_against_reference():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 6, (7, 40), generator=g)
    lengths = torch.randint(0, 41, (7,), generator=g)
    delims = torch.tensor([0, 3])
    steps = credit_ops.segment_steps(tokens, lengths, delims)
    assert torch.equal(steps, reference.segment_steps(tokens, lengths, delims))
    mask = torch.rand(7, 40, generator=g) < 0.1
    assert torch.equal(credit_ops.step_masks(mask, steps), reference.step_masks(mask, steps))
    regions = torch.where(mask, torch.randint(0, 4, (7, 40), generator=g), -1)
    k = torch.randint(0, 4, (7,), generator=g)
    assert torch.equal(credit_ops.truncate_regions(mask, regions, k), reference.truncate_regions(mask, regions, k))


# ---- bad input


def _ab():
    a, la = pack([[1, 2, 3], [4, 5]])
    b, lb = pack([[1, 3], [4, 5, 6]])
    return a, la, b, lb


@pytest.mark.parametrize(
    "mutate_args,match",
    [
        (lambda a, la, b, lb: (a, torch.tensor([4, 2]), b, lb), "a_lengths must lie in \\[0, 3\\]"),
        (lambda a, la, b, lb: (a, la, b, torch.tensor([2, -1])), "b_lengths must lie in \\[0, 3\\]"),
        (lambda a, la, b, lb: (a, la[:1], b, lb), "a_lengths must have shape \\(2,\\)"),
        (lambda a, la, b, lb: (a, la, b[:1], lb), "same number of pairs"),
        (lambda a, la, b, lb: (a.float(), la, b, lb), "a must have dtype in \\(int32, int64\\)"),
        (lambda a, la, b, lb: (a, la, b.double(), lb), "b must have dtype in \\(int32, int64\\)"),
        (lambda a, la, b, lb: (a, la.float(), b, lb), "a_lengths must have dtype"),
        (lambda a, la, b, lb: (a[0], la, b, lb), "a must have 2 dimensions"),
    ],
    ids=[
        "a_length_beyond_La",
        "negative_b_length",
        "a_lengths_wrong_shape",
        "pair_counts_differ",
        "float_a",
        "double_b",
        "float_a_lengths",
        "a_1d",
    ],
)
def test_align_edits_bad_input(mutate_args, match):
    with pytest.raises(ValueError, match=match):
        credit_ops.align_edits(*mutate_args(*_ab()))


def test_align_edits_bad_anchor():
    with pytest.raises(ValueError, match="insert_anchor must be one of"):
        credit_ops.align_edits(*_ab(), insert_anchor="left")


_MASK, _REGIONS = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.int32)
_TOKENS = torch.zeros(2, 4, dtype=torch.int64)


@pytest.mark.parametrize(
    "match,call",
    [
        pytest.param("k must be >= 0", lambda: credit_ops.truncate_regions(_MASK, _REGIONS, -1), id="negative_k"),
        pytest.param(
            "k must be >= 0",
            lambda: credit_ops.truncate_regions(_MASK, _REGIONS, torch.tensor([1, -2])),
            id="negative_k_in_row",
        ),
        pytest.param(
            "k must be a scalar or have shape \\(2,\\)",
            lambda: credit_ops.truncate_regions(_MASK, _REGIONS, torch.tensor([1, 2, 3])),
            id="k_wrong_shape",
        ),
        pytest.param("k must be an int", lambda: credit_ops.truncate_regions(_MASK, _REGIONS, 1.5), id="float_k"),
        pytest.param(
            "regions must have shape",
            lambda: credit_ops.truncate_regions(_MASK, _REGIONS[:, :3], 1),
            id="regions_wrong_shape",
        ),
        pytest.param(
            "step_ids must lie in \\[-1, 4\\)",
            lambda: credit_ops.step_masks(_MASK, torch.tensor([[0, 0, 4, 4], [0, 0, 0, 0]])),
            id="step_id_beyond_T",
        ),
        pytest.param(
            "tokens must have dtype", lambda: credit_ops.segment_steps(torch.zeros(2, 4), None, [0]), id="float_tokens"
        ),
        pytest.param(
            "lengths must lie in \\[0, 4\\]",
            lambda: credit_ops.segment_steps(_TOKENS, torch.tensor([5, 1]), [0]),
            id="length_beyond_T",
        ),
        pytest.param(
            "delimiter_ids must have 1 dimensions",
            lambda: credit_ops.segment_steps(_TOKENS, None, torch.zeros(1, 1, dtype=torch.int64)),
            id="delimiters_2d",
        ),
    ],
)
def test_steps_and_truncation_bad_input(match, call):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend,device", DEVICES)
def test_empty_batch(backend, device):
    a = torch.zeros(0, 5, dtype=torch.int64, device=device)
    b = torch.zeros(0, 3, dtype=torch.int64, device=device)
    lengths = torch.zeros(0, dtype=torch.int64, device=device)
    with credit_ops.use_backend(backend):
        out = credit_ops.align_edits(a, lengths, b, lengths)
    assert out.mask_a.shape == (0, 5) and out.region_b.shape == (0, 3) and out.distance.shape == (0,)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_checkpointed_blocks_and_strips(monkeypatch):
    """A 1 MiB scratch per warp forces the kernel to recompute row blocks from checkpoints; b longer than
    2048 tokens spreads its bits over several strips of 32 words."""
    rng = random.Random(12)
    pairs = random_pairs(rng, 6, 5000, vocabs=(3, 150_000), rates=(0.01, 0.3))
    expected = run(pairs)
    monkeypatch.setenv("CREDIT_OPS_ALIGN_WARP_SCRATCH_MB", "1")
    assert_same(run(pairs, device="cuda"), expected)
    monkeypatch.setenv("CREDIT_OPS_ALIGN_SCRATCH_MB", "1")  # a single warp loops over all pairs
    assert_same(run(pairs, device="cuda"), expected)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_truncate_regions_drops_flags_without_a_region(backend):
    """A flagged token with region -1 (no region) is never kept, whatever k."""
    mask = torch.tensor([[True, True, True, False]])
    regions = torch.tensor([[-1, 0, 1, 0]])
    with credit_ops.use_backend(backend):
        out = credit_ops.truncate_regions(mask, regions, 5)
    assert out.tolist() == [[False, True, True, False]]
