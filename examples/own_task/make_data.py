"""Write a small task of your own as parquet files: image rows and text-only rows mixed, images
embedded as PNG bytes (as parquet files on the HF hub hold them), column names of your choosing.

    python examples/own_task/make_data.py --out data/own_task

Rows: "What colour is the square?" over a picture of a coloured square, and "What is A + B?" with
no picture. Columns: ``question``, ``label``, ``picture`` (bytes, or null for text rows), ``trace``
(a recorded chain of thought: EKIPL's external action here) and ``kind``, which ekipl passes to the
reward function as ``sample.meta["kind"]``.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def picture(colour: str, rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (160, 120), (245, 245, 245))
    x, y = rng.randint(10, 90), rng.randint(10, 50)
    ImageDraw.Draw(im).rectangle([x, y, x + 50, y + 50], fill=COLOURS[colour])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            colour = rng.choice(sorted(COLOURS))
            out.append(
                {
                    "question": "What colour is the square?",
                    "label": colour,
                    "picture": {"bytes": picture(colour, rng), "path": None},
                    "kind": "colour",
                    "trace": f"<think>The square is {colour}.</think> <answer>{colour}</answer>",
                }
            )
        else:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            trace = f"<think>{a} plus {b} is {a + b}.</think> <answer>{a + b}</answer>"
            out.append(
                {
                    "question": f"What is {a} + {b}?",
                    "label": str(a + b),
                    "picture": None,
                    "kind": "sum",
                    "trace": trace,
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    import datasets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/own_task")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-test", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "label": datasets.Value("string"),
            "picture": datasets.Image(),
            "kind": datasets.Value("string"),
            "trace": datasets.Value("string"),
        }
    )
    for split, n, seed in (("train", a.n_train, a.seed), ("test", a.n_test, a.seed + 1)):
        ds = datasets.Dataset.from_list(rows(n, seed), features=features)
        ds.to_parquet(str(out / f"{split}.parquet"))
        print(f"{out / f'{split}.parquet'}: {n} rows")


if __name__ == "__main__":
    main()
