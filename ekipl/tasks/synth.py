"""A synthetic Reason-RFT-CoT stand-in, generated offline and deterministically from a seed.

``ekipl data make --task counting --out DIR`` writes, for each task, the published RL JSON form::

    DIR/<task>/train.json  test_id.json  test_ood.json
    DIR/<task>/images/<split>/<id>[_k].png

Every row carries a solver-written ``cot`` (a full ``<think>..</think><answer>..</answer>``
response), standing in for the GPT-4o traces that Reason-RFT-CoT ships.

Tasks and their OOD shifts:

* ``counting`` (CLEVR-Math style): 3-6 objects; "Subtract all red cubes. How many objects are
  left?". OOD: 7-10 objects and colour/shape pairs never seen in training (Super-CLEVR's role).
* ``geometry`` (structure perception; numeric and multiple choice): the area of the figure from
  its two labelled lengths (2-9), in the same words for every figure, so the figure decides the
  formula: rectangles and right triangles, filled in one of four colours that the trace names.
  OOD: parallelograms, a figure family never seen in training (Geometry3K's role). Choice letters
  are uniform; distractors are the other formulas'.
* ``trance``: an initial and a final scene of one object, drawn to fill most of the frame, and one
  attribute transformation between them; the question lists the initial object's attributes
  (Reason-RFT's tuples); the trace describes the object in both states, side by side, then names
  the change. OOD: the final scene seen from the left or the right (an affine side view), with the
  ID question text.

Each sample's RNG is seeded from (seed, task, split, index), and PNGs carry no metadata, so the same
seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .prompts import TRANCE_FUNCTIONS

W, H = 160, 120
BACKGROUND = (128, 128, 128)
COLORS = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = {"small": 9, "large": 15}
MATERIALS = ("rubber", "metal")
# Colour/shape pairs held out of the ID splits; the OOD split always contains at least one.
HELD_OUT = {("cylinder", "purple"), ("sphere", "cyan"), ("cube", "yellow")}
SPLITS = ("train", "test_id", "test_ood")
# Each generator's version: a change to what a task generates bumps it, so the warm starts trained
# on its rows (ekipl.warm, cached by recipe) are rebuilt. 2: the learnable geometry and TRANCE;
# 3: geometry's figure drawn in a colour the trace names; TRANCE's trace pairs each object's states;
# 4: TRANCE's question lists the initial objects' attributes, as Reason-RFT's does; 5: one TRANCE
# object that fills the frame, and side views for OOD.
VERSIONS = {"counting": 1, "geometry": 3, "trance": 5}


def seeded_rng(seed: int, *parts) -> random.Random:
    """A generator seeded by ``seed`` and the names of what it makes (task, split, row): each row
    draws the same numbers whatever was made before it."""
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def _plural(shape: str) -> str:
    return {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders"}[shape]


# --------------------------------------------------------------------------------------------------
# Scenes


def _random_object(rng: random.Random, ood: bool) -> dict:
    while True:
        obj = {
            "shape": rng.choice(SHAPES),
            "color": rng.choice(sorted(COLORS)),
            "size": rng.choice(["small", "large"]),
            "material": rng.choice(MATERIALS),
        }
        if ood or (obj["shape"], obj["color"]) not in HELD_OUT:
            return obj


def _place(rng: random.Random, objects: list[dict]) -> None:
    placed = []
    for obj in objects:
        r = SIZES[obj["size"]]
        for _ in range(200):
            x, y = rng.randint(r + 2, W - r - 2), rng.randint(r + 2, H - r - 2)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 3) ** 2 for px, py, pr in placed):
                break
        obj["x"], obj["y"] = x, y
        placed.append((x, y, r))


def _draw_object(d: ImageDraw.ImageDraw, obj: dict) -> None:
    x, y, r = obj["x"], obj["y"], obj.get("r", SIZES[obj["size"]])
    fill = COLORS[obj["color"]]
    if obj["shape"] == "cube":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=(30, 30, 30))
    elif obj["shape"] == "sphere":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(30, 30, 30))
    else:
        cap = 2 * r // 3 if obj.get("cap") else 8  # TRANCE's large objects: a top that shows
        d.rectangle([x - r, y - r + cap // 2, x + r, y + r], fill=fill, outline=(30, 30, 30))
        d.ellipse([x - r, y - r, x + r, y - r + cap], fill=fill, outline=(30, 30, 30))
    if obj["material"] == "metal":
        d.ellipse([x - r // 2, y - r // 2, x - r // 2 + 4, y - r // 2 + 4], fill=(255, 255, 255))


def _render(objects: list[dict]) -> Image.Image:
    img = Image.new("RGB", (W, H), BACKGROUND)
    d = ImageDraw.Draw(img)
    for obj in objects:
        _draw_object(d, obj)
    return img


def _describe(obj: dict) -> str:
    return f"{obj['size']} {obj['color']} {obj['material']} {obj['shape']}"


# --------------------------------------------------------------------------------------------------
# Tasks: each returns (row fields, images)


def _counting(rng: random.Random, ood: bool):
    n = rng.randint(7, 10) if ood else rng.randint(3, 6)
    objects = [_random_object(rng, ood) for _ in range(n)]
    if ood and not any((o["shape"], o["color"]) in HELD_OUT for o in objects):
        shape, color = sorted(HELD_OUT)[rng.randrange(len(HELD_OUT))]
        objects[0].update(shape=shape, color=color)
    _place(rng, objects)
    kind = rng.choice(["count", "subtract", "subtract2"])
    if kind == "count":
        question, removed, steps = "How many objects are there?", [], []
    else:
        removed, steps, parts = set(), [], []
        for _ in range(1 if kind == "subtract" else 2):
            target = rng.choice(objects)
            attrs = {"shape": target["shape"]}
            if rng.random() < 0.6:
                attrs["color"] = target["color"]
            elif rng.random() < 0.5:
                attrs["size"] = target["size"]
            hit = {i for i, o in enumerate(objects) if all(o[k] == v for k, v in attrs.items())}
            phrase = (
                " ".join(attrs[k] for k in ("size", "color") if k in attrs) + " " + _plural(attrs["shape"])
            )
            parts.append(f"Subtract all {phrase.strip()}.")
            steps.append((phrase.strip(), len(hit - removed)))
            removed |= hit
        question = " ".join(parts) + " How many objects are left?"
    answer = n - len(removed)
    think = f"I count {n} objects: " + ", ".join(_describe(o) for o in objects) + "."
    left = n
    for phrase, k in steps:
        think += f" Subtracting all {phrase} removes {k}, leaving {left - k}."
        left -= k
    think += f" So the answer is {answer}."
    row = {
        "problem": question,
        "answer": str(answer),
        "cot": f"<think>{think}</think><answer>{answer}</answer>",
    }
    return row, [_render(objects)]


# Geometry: the figure is read off the image (which figure it is decides the formula); the question's
# text gives the two labelled lengths, as Geometry3K's do, and is the same for every figure.
_FIGURES = {
    # name: (polygon in the 160x120 frame, what the two lengths are, the area's formula)
    "rectangle": ([(25, 25), (135, 25), (135, 95), (25, 95)], "sides {a} and {b}", "{a} * {b}"),
    "right triangle": ([(25, 95), (135, 95), (25, 25)], "legs {a} and {b}", "{a} * {b} / 2"),
    # OOD: a figure family never seen in training (base and height: the rectangle's formula)
    "parallelogram": ([(50, 25), (145, 25), (110, 95), (15, 95)], "base {a} and height {b}", "{a} * {b}"),
}
GEOMETRY_ID = ("rectangle", "right triangle")
GEOMETRY_OOD = ("parallelogram",)
# The figure's fill, drawn independently of the figure and named in the trace just before it. It
# carries no answer; it makes the trace read the image from its first words, as counting's scene
# list does, so a tiny vision tower learns to look (without it the figure word was the trace's one
# image-dependent token, and 300 SFT steps never learned it: one name for every figure).
GEOMETRY_FILLS = {
    "blue": (120, 160, 240),
    "green": (120, 200, 120),
    "orange": (240, 170, 90),
    "purple": (190, 140, 220),
}


def _choices(rng: random.Random, value: float, a: int, b: int) -> tuple[list[str], str]:
    """Four options with the answer's letter drawn uniformly; the distractors are what the other
    formulas (and near misses) give, so reading the figure is what picks the right one."""
    text = f"{value:g}"
    pool = [a * b, a * b / 2, a + b, 2 * (a + b), value + 1, value - 1, value + 2, value * 2]
    wrong = []
    for v in pool:
        t = f"{round(v, 2):g}"
        if v > 0 and t != text and t not in wrong:
            wrong.append(t)
    wrong = rng.sample(wrong, 3)
    pos = rng.randrange(4)
    return wrong[:pos] + [text] + wrong[pos:], "ABCD"[pos]


def _geometry(rng: random.Random, ood: bool):
    name = rng.choice(GEOMETRY_OOD if ood else GEOMETRY_ID)
    poly, lengths, formula = _FIGURES[name]
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    fill = rng.choice(sorted(GEOMETRY_FILLS))
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.polygon(poly, fill=GEOMETRY_FILLS[fill], outline=(0, 0, 0), width=3)
    if name == "parallelogram":
        d.line([(50, 25), (50, 95)], fill=(0, 0, 200), width=2)  # the height
        d.text((52, 55), f"{b}", fill=(0, 0, 0))
    else:
        d.text((12, 55), f"{b}", fill=(0, 0, 0))
    if name == "right triangle":
        d.rectangle([25, 85, 35, 95], outline=(0, 0, 0))
    d.text((75, 102), f"{a}", fill=(0, 0, 0))
    value = a * b / 2 if name == "right triangle" else a * b
    text = f"{value:g}"
    question = f"In the figure the labelled lengths are {a} and {b}. Find the area of the figure."
    given, product = lengths.format(a=a, b=b), formula.format(a=a, b=b)
    think = f"The figure is a {fill} {name} with {given}, so its area is {product} = {text}"
    if rng.random() < 0.4:  # multiple choice
        opts, letter = _choices(rng, value, a, b)
        question += " Choices: " + " ".join(f"({ch}) {o}" for ch, o in zip("ABCD", opts, strict=True))
        answer = letter
        think += f", which is option {letter}."
    else:
        answer = text
        think += "."
    row = {"problem": question, "answer": answer, "cot": f"<think>{think}</think><answer>{answer}</answer>"}
    return row, [img]


# TRANCE: TRANCE_OBJECTS objects, indexed in TRANCE_SLOTS' order, and one transformation of
# three attribute functions (colour among four, size, shape), its values from Reason-RFT's sets. The
# trace describes each state, as counting's describes its scene, then compares the descriptions.
TRANCE_COLORS = ("red", "blue", "green", "yellow")
TRANCE_OBJECTS = 1
_TRANCE_FUNCS = ("change_color", "change_size", "change_shape")
assert all(v in TRANCE_FUNCTIONS["change_color"] for v in TRANCE_COLORS)


# One object, drawn to fill most of the frame (generator 5): an attribute of the object is then a
# property of the whole image, as geometry's fill is, which the tiny warm start learns to read; an
# object covering 2-4 of the image's 24 tokens (generators 1-4) never was (bench/LEARNING.md).
TRANCE_SIZES = {"small": 30, "large": 52}
TRANCE_SLOTS = ((80, 60),)


def _trance_place(rng: random.Random, objects: list[dict]) -> None:
    for obj, (x, y) in zip(objects, TRANCE_SLOTS, strict=True):
        obj["x"], obj["y"] = x + rng.randint(-4, 4), y + rng.randint(-3, 3)


# The OOD views: the final scene seen from the left or the right, an affine side view (squeezed to
# 3/4 of its width and sheared), so a square becomes a parallelogram and a circle an ellipse.
_VIEWS = {"left": 0.25, "right": -0.25}


def _side_view(img: Image.Image, view: str) -> Image.Image:
    cx, cy, shear = W / 2, H / 2, _VIEWS[view]
    data = (1 / 0.75, shear, cx - cx / 0.75 - shear * cy, 0.0, 1.0, 0.0)
    return img.transform(
        img.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=BACKGROUND
    )


def _trance_object(rng: random.Random) -> dict:
    return {
        "shape": rng.choice(SHAPES),
        "color": rng.choice(TRANCE_COLORS),
        "size": rng.choice(["small", "large"]),
        "material": "rubber",
        "cap": True,  # a cylinder's top drawn in proportion to its size (_draw_object)
    }


def _transform(rng: random.Random, obj: dict) -> tuple[str, str]:
    func = rng.choice(_TRANCE_FUNCS)
    attr = func.removeprefix("change_")
    pool = {"color": TRANCE_COLORS, "size": ("small", "large"), "shape": SHAPES}[attr]
    value = rng.choice([v for v in pool if v != obj[attr]])
    obj[attr] = value
    return func, value


def _describe_pair(i: int, before: dict, after: dict) -> str:
    """One object in both states, side by side, so the comparison is local (adjacent words)."""

    def words(o: dict) -> str:
        return f"{o['size']} {o['color']} {o['shape']}"

    return f"Object {i} is a {words(before)} in the initial state and a {words(after)} in the final state"


def _trance(rng: random.Random, ood: bool):
    objects = [_trance_object(rng) for _ in range(TRANCE_OBJECTS)]
    _trance_place(rng, objects)
    final = [dict(o) for o in objects]
    idx = rng.randrange(len(objects))
    func, value = _transform(rng, final[idx])
    for o in (*objects, *final):
        o["r"] = TRANCE_SIZES[o["size"]]
    view = rng.choice(["left", "right"]) if ood else "center"
    answer = f"{func}({idx}, {value})"
    # Each object in both states, then whether it changed: every decision compares words a few tokens
    # apart, where describing the two states one after the other (generator 2) left a 4-layer model
    # to compare descriptions 20 tokens apart, which 300 SFT steps did not teach (it named one
    # function for every problem).
    parts, attr = [], func.removeprefix("change_")
    for i, (a, b) in enumerate(zip(objects, final, strict=True)):
        parts.append(
            _describe_pair(i, a, b) + (f", so its {attr} changed to {value}" if i == idx else ", unchanged")
        )
    think = ". ".join(parts) + f". So the answer is {answer}."
    # Reason-RFT's TRANCE questions list the initial objects' attributes as
    # ('object_id', 'shape', 'size', 'color', 'material') tuples, so a model reads the initial state
    # from the text and the final state from the second image. With it, generator 4's warm start
    # (two small objects) copied the listed sizes and colours into its trace but read nothing off
    # the final image; generator 5's (one object filling the frame) reads its colour and size
    # (bench/LEARNING.md).
    attrs = ", ".join(
        f"('{i}', '{o['shape']}', '{o['size']}', '{o['color']}', '{o['material']}')"
        for i, o in enumerate(objects)
    )
    row = {
        # the same question in every split (the list is each row's): the OOD shift is the view alone
        "problem": f"The attributes of the initial objects: [{attrs}]. What transformations happened?",
        "answer": answer,
        "cot": f"<think>{think}</think><answer>{answer}</answer>",
        "view": view,
    }
    final_img = _render(final)
    return row, [_render(objects), _side_view(final_img, view) if ood else final_img]


GENERATORS = {"counting": _counting, "geometry": _geometry, "trance": _trance}


def make_split(task: str, split: str, n: int, out: Path, seed: int) -> Path:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; synthetic tasks: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    root = Path(out) / task
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = seeded_rng(seed, task, split, i)
        row, images = GENERATORS[task](rng, ood=(split == "test_ood"))
        sid = f"{task}-{split}-{i:06d}"
        names = []
        for k, img in enumerate(images):
            name = f"images/{split}/{sid}{'' if len(images) == 1 else f'_{k}'}.png"
            img.save(root / name, format="PNG", optimize=False)
            names.append(name)
        rows.append({"id": sid, "task": task, "image": names[0] if len(names) == 1 else names, **row})
    path = root / f"{split}.json"
    path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return path


def make_dataset(task: str, out: str | Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict:
    """Write the train, test_id and test_ood splits of ``task``; returns {split: json path}."""
    sizes = {"train": n_train, "test_id": n_test, "test_ood": n_test}
    return {split: make_split(task, split, n, Path(out), seed) for split, n in sizes.items()}
