"""A synthetic Reason-RFT-CoT stand-in, generated offline and deterministically from a seed.

``ekipl data make --task counting --out DIR`` writes, for each task, the published RL JSON form::

    DIR/<task>/train.json  test_id.json  test_ood.json
    DIR/<task>/images/<split>/<id>[_k].png

Every row carries a solver-written ``cot`` (a full ``<think>..</think><answer>..</answer>``
response), standing in for the GPT-4o traces that Reason-RFT-CoT ships.

Tasks and their OOD shifts:

* ``counting`` (CLEVR-Math style): 3-6 objects; "Subtract all red cubes. How many objects are
  left?". OOD: 7-10 objects and colour/shape pairs never seen in training (Super-CLEVR's role).
* ``geometry`` (numeric and multiple choice): right triangles with labelled legs, asking for the
  hypotenuse or the area. OOD: rectangles asking for a diagonal or perimeter, larger sides
  (Geometry3K's role).
* ``trance``: an initial and a final scene of indexed objects and the transformations between them.
  OOD: the final scene rendered from the left or right view (mirrored).

Each sample's RNG is seeded from (seed, task, split, index), and PNGs carry no metadata, so the same
seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
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
SIZES = {"small": 9, "medium": 12, "large": 15}
MATERIALS = ("rubber", "metal")
# Colour/shape pairs held out of the ID splits; the OOD split always contains at least one.
HELD_OUT = {("cylinder", "purple"), ("sphere", "cyan"), ("cube", "yellow")}
SPLITS = ("train", "test_id", "test_ood")


def _rng(seed: int, *parts) -> random.Random:
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


def _draw_object(d: ImageDraw.ImageDraw, obj: dict, label: str | None = None) -> None:
    x, y, r = obj["x"], obj["y"], SIZES[obj["size"]]
    fill = COLORS[obj["color"]]
    if obj["shape"] == "cube":
        d.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=(30, 30, 30))
    elif obj["shape"] == "sphere":
        d.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(30, 30, 30))
    else:
        d.rectangle([x - r, y - r + 4, x + r, y + r], fill=fill, outline=(30, 30, 30))
        d.ellipse([x - r, y - r, x + r, y - r + 8], fill=fill, outline=(30, 30, 30))
    if obj["material"] == "metal":
        d.ellipse([x - r // 2, y - r // 2, x - r // 2 + 4, y - r // 2 + 4], fill=(255, 255, 255))
    elif obj["material"] == "glass":
        d.line([x - r, y + r, x + r, y - r], fill=(230, 230, 230))
    if label is not None:
        d.text((x + r - 2, y - r - 10), label, fill=(255, 255, 255))


def _render(objects: list[dict], labels: bool = False, mirror: bool = False) -> Image.Image:
    img = Image.new("RGB", (W, H), BACKGROUND)
    d = ImageDraw.Draw(img)
    for i, obj in enumerate(objects):
        _draw_object(d, obj, str(i) if labels else None)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else img


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


def _geometry(rng: random.Random, ood: bool):
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if ood:
        a, b = rng.randint(8, 30), rng.randint(8, 30)
        d.rectangle([20, 20, 140, 100], outline=(0, 0, 0), width=2)
        d.line([20, 100, 140, 20], fill=(0, 0, 200))
        d.text((70, 102), f"{a}", fill=(0, 0, 0))
        d.text((143, 55), f"{b}", fill=(0, 0, 0))
        if rng.random() < 0.5:
            value, what = math.hypot(a, b), "the length of the diagonal"
            think = f"The diagonal of the {a} by {b} rectangle is sqrt({a}^2 + {b}^2)"
        else:
            value, what = 2 * (a + b), "the perimeter of the rectangle"
            think = f"The perimeter of a {a} by {b} rectangle is 2 * ({a} + {b})"
        question = f"The rectangle has sides {a} and {b}. Find {what}."
    else:
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        d.polygon([(20, 100), (140, 100), (20, 20)], outline=(0, 0, 0), width=2)
        d.rectangle([20, 90, 30, 100], outline=(0, 0, 0))
        d.text((75, 102), f"{a}", fill=(0, 0, 0))
        d.text((6, 55), f"{b}", fill=(0, 0, 0))
        if rng.random() < 0.5:
            value, what = math.hypot(a, b), "the length of the hypotenuse"
            think = f"By the Pythagorean theorem the hypotenuse is sqrt({a}^2 + {b}^2)"
        else:
            value, what = a * b / 2, "the area of the triangle"
            think = f"The area of a right triangle with legs {a} and {b} is {a} * {b} / 2"
        question = f"In the right triangle the legs are {a} and {b}. Find {what}."
    value = round(value, 2)
    text = f"{value:g}"
    if rng.random() < 0.4:  # multiple choice
        options = {text}
        while len(options) < 4:
            options.add(f"{round(value * rng.uniform(0.5, 1.6) + rng.randint(1, 3), 2):g}")
        opts = sorted(options, key=float)
        letter = "ABCD"[opts.index(text)]
        question += " Choices: " + " ".join(f"({ch}) {o}" for ch, o in zip("ABCD", opts, strict=True))
        answer = letter
        think += f" = {text}, which is option {letter}."
    else:
        answer = text
        think += f" = {text}."
    row = {"problem": question, "answer": answer, "cot": f"<think>{think}</think><answer>{answer}</answer>"}
    return row, [img]


_MOVES = {"left": (-22, 0), "right": (22, 0), "front": (0, 18), "behind": (0, -18)}


def _trance(rng: random.Random, ood: bool):
    n = rng.randint(3, 5)
    objects = [_random_object(rng, True) for _ in range(n)]
    for o in objects:
        o["size"] = rng.choice(["small", "medium", "large"])
        o["material"] = rng.choice(["rubber", "metal", "glass"])
    _place(rng, objects)
    final = [dict(o) for o in objects]
    steps, touched = [], set()
    for _ in range(rng.randint(1, 3)):
        func = rng.choice(sorted(TRANCE_FUNCTIONS))
        idx = rng.randrange(n)
        if (idx, func) in touched:
            continue
        touched.add((idx, func))
        obj = final[idx]
        if func == "change_position":
            value = rng.choice(sorted(_MOVES))
            dx, dy = _MOVES[value]
            obj["x"] = min(max(obj["x"] + dx, 16), W - 16)
            obj["y"] = min(max(obj["y"] + dy, 16), H - 16)
        else:
            attr = func.removeprefix("change_")
            choices = [
                v for v in TRANCE_FUNCTIONS[func] if v != obj[attr] and (attr != "color" or v in COLORS)
            ]
            value = rng.choice(choices)
            obj[attr] = value
        steps.append(f"{func}({idx}, {value})")
    view = rng.choice(["left", "right"]) if ood else "center"
    question = "What transformations happened?"
    if ood:
        question += f" The final state is shown from the {view} view."
    answer = ", ".join(steps)
    think = "Comparing each indexed object between the two states: " + "; ".join(steps) + "."
    row = {
        "problem": question,
        "answer": answer,
        "cot": f"<think>{think}</think><answer>{answer}</answer>",
        "view": view,
    }
    return row, [_render(objects, labels=True), _render(final, labels=not ood, mirror=ood)]


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
        rng = _rng(seed, task, split, i)
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
