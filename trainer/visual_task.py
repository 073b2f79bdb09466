"""Visual tasks: the answer depends on an image the prompt does not describe.

    visual   built in: n digits drawn as 7-segment glyphs (PIL rectangles, no fonts), one per 16x16 cell; the
             prompt holds only the operations, e.g. "A+B-C=" (A, B, C: the digits left to right). Solutions read
             each digit just before using it, so a misread and an arithmetic slip are different first wrong steps:
                 image 7 2 4, prompt "A+B-C="  ->  "A=7;B=2;7+2=9;C=4;9-4=5;#5"
    vjsonl   a local JSONL file of {"image": path, "prompt", "answer", "steps"?}; image paths are relative to the
             JSONL file

The oracle repair is tasks.oracle_repair (keep the correct steps, rewrite from the first wrong one): it repairs
a misread (`C=1` for 4) and an arithmetic slip (`9-4=6`) alike.
"""

import json
import os
from dataclasses import dataclass

import torch

from .tasks import Problem, RowTask, Task

# 7-segment glyphs: a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle
SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
# each segment's rectangle (x0, y0, x1, y1), inclusive, inside a 16x16 cell (2 px strokes)
RECTS = {"a": (4, 2, 11, 3), "b": (10, 2, 11, 8), "c": (10, 7, 11, 13), "d": (4, 12, 11, 13), "e": (4, 7, 5, 13),
         "f": (4, 2, 5, 8), "g": (4, 7, 11, 8)}  # fmt: skip
CELL = 16
LETTERS = "ABCDEFGH"


def _neighbours() -> dict[int, list[int]]:
    """The digits whose glyph differs from each digit's in the fewest segments (the likely misreads):
    8 -> 0, 6, 9; 1 -> 7; ..."""
    out = {}
    for d, s in SEGMENTS.items():
        dist = {e: len(set(s) ^ set(t)) for e, t in SEGMENTS.items() if e != d}
        out[d] = sorted(e for e, k in dist.items() if k == min(dist.values()))
    return out


NEIGHBOURS = _neighbours()


def render_digits(digits: list[int], gen: torch.Generator):
    """A (16 * n) x 16 RGB image of the digits, left to right: each glyph shifted by up to 1 px and drawn in a
    random dark grey on white. Deterministic given the generator."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (CELL * len(digits), CELL), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, d in enumerate(digits):
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        grey = int(torch.randint(0, 110, (), generator=gen))
        for seg in SEGMENTS[d]:
            x0, y0, x1, y1 = RECTS[seg]
            draw.rectangle((k * CELL + x0 + dx, y0 + dy, k * CELL + x1 + dx, y1 + dy), fill=(grey, grey, grey))
    return img


@dataclass
class VisualProblem(Problem):
    image: object = None  # a PIL image: the prompt is about it
    image_path: str = ""  # vjsonl: the image's path as the dataset names it


class DigitTask(Task):
    """Read n digits from the image, combine them with the prompt's operations, one step at a time.

    prompt  "A+B-C="                 (the running total stays >= 0; the digits exist only in the image)
    steps   "A=7", "B=2", "7+2=9", "C=4", "9-4=5" then "#5"

    Warm-start demonstrations are noisy on purpose: each read slips to a 7-segment neighbour with probability
    read_slip_prob, each operation's result by 1-3 with probability slip_prob, the rest of the chain consistent
    with the slip. The warm-started policy then misreads and slips at about those rates: wrong trajectories whose
    first wrong step is either a perception step (X=d) or a reasoning step (a op b = c).
    """

    name = "visual"
    checkable = True

    def __init__(
        self,
        n_digits: int = 3,
        ops: str = "+-",
        slip_prob: float = 0.0,
        read_slip_prob: float = 0.0,
        eval_fraction: float = 0.1,
    ):
        if not 2 <= n_digits <= len(LETTERS):
            raise ValueError(f"task.n_terms (digits in the image) must be in [2, {len(LETTERS)}], got {n_digits}")
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"task.ops must be a non-empty subset of '+-', got {ops!r}")
        for name, p in (("slip_prob", slip_prob), ("read_slip_prob", read_slip_prob)):
            if not 0 <= p < 1:
                raise ValueError(f"task.{name} must be in [0, 1), got {p}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"task.eval_fraction must be in (0, 1), got {eval_fraction}")
        self.n, self.ops, self.slip_prob, self.read_slip_prob = n_digits, ops, slip_prob, read_slip_prob
        self.eval_fraction = eval_fraction

    def key(self, problem) -> str:
        """The prompt names only the operations: the digits identify the problem (for the train/eval split)."""
        return f"{problem.prompt}{problem.meta['digits']}"

    def draw(self, gen: torch.Generator) -> VisualProblem:
        def rnd(hi):
            return int(torch.randint(0, hi + 1, (1,), generator=gen))

        digits, ops = [rnd(9)], []
        total = digits[0]
        for _ in range(self.n - 1):
            op = self.ops[rnd(len(self.ops) - 1)]
            x = rnd(9 if op == "+" else min(9, total))
            total = total + x if op == "+" else total - x
            digits.append(x)
            ops.append(op)
        prompt = LETTERS[0] + "".join(f"{op}{LETTERS[k + 1]}" for k, op in enumerate(ops)) + "="
        steps = self.chain(digits, ops)
        return VisualProblem(
            prompt, str(total), steps, self.delimiter, {"digits": digits}, image=render_digits(digits, gen)
        )

    @staticmethod
    def chain(digits: list[int], ops: list[str], results: list[int] | None = None) -> list[str]:
        """The steps for these read digits: "A=d0", then per operation "X=d" and "t op d = r" (r = results[k] if
        given, else the true result)."""
        steps, total = [f"{LETTERS[0]}={digits[0]}"], digits[0]
        for k, (op, d) in enumerate(zip(ops, digits[1:], strict=True)):
            new = total + d if op == "+" else total - d
            if results is not None:
                new = results[k]
            steps += [f"{LETTERS[k + 1]}={d}", f"{total}{op}{d}={new}"]
            total = new
        return steps

    def image_token_text(self, problem) -> str:
        """What each image token shows (one per 16x16 cell): the digits, left to right; the warm start's
        projector alignment (vision.alignment_loss) uses it."""
        return "".join(map(str, problem.meta["digits"]))

    def demonstration(self, problem, gen):
        if self.slip_prob <= 0 and self.read_slip_prob <= 0:
            return problem.solution
        ops = [c for c in problem.prompt if c in "+-"]
        read = []
        for d in problem.meta["digits"]:
            if float(torch.rand((), generator=gen)) < self.read_slip_prob:
                nb = NEIGHBOURS[d]
                d = nb[int(torch.randint(0, len(nb), (), generator=gen))]
            read.append(d)
        total, results = read[0], []
        for op, d in zip(ops, read[1:], strict=True):
            new = total + d if op == "+" else total - d
            if float(torch.rand((), generator=gen)) < self.slip_prob:
                off = int(torch.randint(1, 4, (), generator=gen))
                new = new + off if new - off < 0 or float(torch.rand((), generator=gen)) < 0.5 else new - off
            results.append(new)
            total = new
        return self.delimiter.join([*self.chain(read, ops, results), f"#{total}"])


class VisualJsonlTask(RowTask):
    """Local JSONL: one {"image", "prompt", "answer", "steps"?} object per line; "image" is a path relative to the
    JSONL file. Checkable when every row has steps. Every image is opened and checked when the task is built.
    The eval split: eval_fraction of the distinct (prompt, image) pairs, by hash (one question may be asked of
    many images)."""

    name = "vjsonl"

    def __init__(self, path: str, delimiter: str = ";", eval_fraction: float = 0.1):
        self.delimiter, self.eval_fraction = delimiter, eval_fraction
        rows = [
            VisualProblem(
                str(row["prompt"]),
                str(row["answer"]),
                row.get("steps"),
                delimiter,
                row.get("meta", {}),
                image=img,
                image_path=row["image"],
            )  # fmt: skip
            for row, img in check_dataset(path)
        ]
        self.split_rows(rows)
        self.checkable = all(r.steps is not None for r in rows)

    def key(self, problem) -> str:
        return f"{problem.prompt}\n{problem.image_path}"


def check_dataset(path: str) -> list[tuple[dict, object]]:
    """The rows of a vjsonl dataset with their images (RGB PIL), each checked: the fields of config.read_dataset,
    plus "image", a path relative to the JSONL file that exists and opens as an image. Raises ConfigError naming
    the file, the row and the image."""
    from PIL import Image

    from .config import ConfigError, read_dataset

    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, row in enumerate(read_dataset(path), 1):
        where = f"task.path: {path}: row {i}"
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise ConfigError(f"{where}: missing field 'image' (a path to the image, relative to the JSONL file)")
        p = os.path.join(root, row["image"])
        if not os.path.isfile(p):
            raise ConfigError(f"{where}: image {row['image']!r} not found (looked for {p})")
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ConfigError(f"{where}: image {p} cannot be read ({type(e).__name__}: {e})") from None
        out.append((row, img))
    return out


VISUAL_TASKS = ("visual", "vjsonl")


def build_visual_task(cfg) -> Task:
    t = cfg.task
    if t.name == "visual":
        return DigitTask(t.n_terms, t.ops, t.slip_prob, t.read_slip_prob, t.eval_fraction)
    if t.name == "vjsonl":
        return VisualJsonlTask(t.path, t.delimiter, t.eval_fraction)
    raise ValueError(f"task.name {t.name!r} is not a visual task ({', '.join(VISUAL_TASKS)})")


def write_dataset(task: DigitTask, n: int, path: str, seed: int = 0) -> str:
    """Write n problems of the digit task as a vjsonl dataset: path (JSONL) and its PNGs beside it."""
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(path, "w") as f:
        for i, p in enumerate(task.sample(n, torch.Generator().manual_seed(seed))):
            name = f"images/{i:05d}.png"
            p.image.save(os.path.join(root, name))
            f.write(json.dumps({"image": name, "prompt": p.prompt, "answer": p.answer, "steps": p.steps}) + "\n")
    return path
