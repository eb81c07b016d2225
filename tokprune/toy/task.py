"""A procedural visual question-answering task where answers depend on small regions of the image.

Each 112x112 scene holds 2-5 small objects (square, circle, triangle; red, green, blue, yellow), each a
distinct colour-shape pair, on a cluttered background (noise, grey strokes, pale distractor blobs).
Questions have one-word answers:

  what color is the <shape> ?            -> colour        (the shape occurs once)
  what shape is the <color> object ?     -> shape         (the colour occurs once)
  how many <color> objects ?             -> zero..three
  is there a <color> <shape> ?           -> yes / no
  is the <c1> <s1> left of the <c2> <s2> ?  -> yes / no

Everything is drawn from one numpy Generator, so a seed fixes the data set exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 112
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
COUNTS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("color", "shape", "count", "exists", "left")
PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)  # the 12 colour-shape pairs


@dataclass
class Sample:
    """One question about one scene.

    image: (112, 112, 3) uint8; objects: (color, shape, cx, cy); owner: (112, 112) uint8, 0 for background
    and 1 + the colour-shape pair index (see `PAIRS`) on each object's pixels.
    """

    image: np.ndarray
    question: str
    answer: str
    kind: str
    objects: list[tuple[str, str, int, int]]
    owner: np.ndarray


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(90, 150)
    img = base + rng.normal(0, 18, (SIZE, SIZE, 1)).repeat(3, axis=2) + rng.normal(0, 6, (SIZE, SIZE, 3))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for _ in range(rng.integers(3, 7)):  # grey strokes
        x0, y0, angle = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(0, np.pi)
        dist = np.abs((xx - x0) * np.sin(angle) - (yy - y0) * np.cos(angle))
        img[dist < rng.uniform(0.6, 1.6)] = rng.integers(60, 200)
    for _ in range(rng.integers(2, 5)):  # pale blobs that are not objects
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(4, 9)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(150, 200, 3)
    return img


def _shape_mask(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    return (dy <= half) & (dy >= -half) & (np.abs(dx) <= (dy + half) / 2)  # triangle, apex up


def _place(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """n centres at least 20 px apart, 10 px from the border."""
    centres: list[tuple[int, int]] = []
    while len(centres) < n:
        c = (int(rng.integers(10, SIZE - 10)), int(rng.integers(10, SIZE - 10)))
        if all((c[0] - x) ** 2 + (c[1] - y) ** 2 >= 20**2 for x, y in centres):
            centres.append(c)
    return centres


def draw_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, str, int, int]], np.ndarray]:
    """(image (112, 112, 3) uint8, objects, owner (112, 112) uint8); see `Sample`."""
    n = int(rng.integers(2, 6))
    chosen = rng.choice(len(PAIRS), n, replace=False)
    img = _background(rng)
    owner = np.zeros((SIZE, SIZE), dtype=np.uint8)
    objects = []
    for pair, (cx, cy) in zip(chosen, _place(rng, n)):
        color, shape = PAIRS[pair]
        mask = _shape_mask(shape, cx, cy, rng.uniform(5.0, 7.5))
        img[mask] = np.array(COLORS[color]) + rng.normal(0, 8, 3)
        owner[mask] = pair + 1
        objects.append((color, shape, cx, cy))
    return np.clip(img, 0, 255).astype(np.uint8), objects, owner


def ask(rng: np.random.Generator, kind: str, objects) -> tuple[str, str] | None:
    colors = [o[0] for o in objects]
    shapes = [o[1] for o in objects]
    if kind == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        shape = unique[rng.integers(len(unique))]
        return f"what color is the {shape} ?", colors[shapes.index(shape)]
    if kind == "shape":
        unique = [c for c in COLORS if colors.count(c) == 1]
        if not unique:
            return None
        color = unique[rng.integers(len(unique))]
        return f"what shape is the {color} object ?", shapes[colors.index(color)]
    if kind == "count":
        color = list(COLORS)[rng.integers(len(COLORS))]
        return f"how many {color} objects ?", COUNTS[colors.count(color)]
    if kind == "exists":
        if rng.random() < 0.5:
            color, shape = objects[rng.integers(len(objects))][:2]
        else:
            color, shape = list(COLORS)[rng.integers(4)], SHAPES[rng.integers(3)]
        answer = "yes" if (color, shape) in set(zip(colors, shapes)) else "no"
        return f"is there a {color} {shape} ?", answer
    a, b = rng.choice(len(objects), 2, replace=False)
    (c1, s1, x1, _), (c2, s2, x2, _) = objects[a], objects[b]
    if abs(x1 - x2) < 6:
        return None
    return f"is the {c1} {s1} left of the {c2} {s2} ?", "yes" if x1 < x2 else "no"


def generate(n: int, seed: int) -> list[Sample]:
    """n samples, question types in rotation, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    while len(samples) < n:
        image, objects, owner = draw_scene(rng)
        kind = QUESTION_TYPES[len(samples) % len(QUESTION_TYPES)]
        asked = ask(rng, kind, objects)
        if asked is not None:
            samples.append(Sample(image, asked[0], asked[1], kind, objects, owner))
    return samples


def generate_scenes(n: int, seed: int) -> list[tuple[Sample, list[tuple[str, str]]]]:
    """n scenes for training, each with every question type it can answer, in a seeded random order:
    [(first question as a Sample, [(question, answer), ...] for the others)]. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        image, objects, owner = draw_scene(rng)
        asked = [(kind, ask(rng, kind, objects)) for kind in QUESTION_TYPES]
        asked = [asked[i] for i in rng.permutation(len(asked)) if asked[i][1] is not None]
        (kind, (question, answer)), rest = asked[0], [qa for _, qa in asked[1:]]
        scenes.append((Sample(image, question, answer, kind, objects, owner), rest))
    return scenes


def vocabulary() -> list[str]:
    """Every word a question or answer can use."""
    words = [
        "what",
        "color",
        "is",
        "the",
        "shape",
        "object",
        "how",
        "many",
        "objects",
        "there",
        "a",
        "left",
        "of",
        "?",
    ]
    return sorted(set(words) | set(COLORS) | set(SHAPES) | set(COUNTS) | {"yes", "no"})


def presence_labels(objects) -> np.ndarray:
    """(12,) 0/1 presence of every colour-shape pair (the [CLS] auxiliary target)."""
    present = {(o[0], o[1]) for o in objects}
    return np.array([p in present for p in PAIRS], dtype=np.float32)


def patch_labels(sample: Sample, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch targets in raster order, ((P,), (P,)) int64 with P = (112 / patch)^2.

    The first is the pair (1 + index into `PAIRS`) covering at least a quarter of the patch, else 0; the
    second is 1 on the patch that holds an object's centre pixel, else 0.
    """
    g = SIZE // patch
    blocks = sample.owner.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    counts = np.stack([(blocks == k).sum(1) for k in range(1, len(PAIRS) + 1)], axis=1)
    covered = np.where(counts.max(1) * 4 >= patch * patch, counts.argmax(1) + 1, 0)
    centre = np.zeros(g * g, dtype=np.int64)
    for _, _, cx, cy in sample.objects:
        centre[(cy // patch) * g + cx // patch] = 1
    return covered.astype(np.int64), centre
