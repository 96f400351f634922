"""Draws docs/dataflow.png, the README's picture of one EKIPL step: python docs/dataflow.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, w, h, text, colour)
    "data": (0.2, 4.2, 2.2, 1.0, "prompts + images\n(data.train_file)", "#e8eef7"),
    "policy": (3.2, 5.2, 2.8, 1.1, "policy vLLM engines\n(Ray actors, model.*)", "#dbeafe"),
    "aux": (3.2, 3.4, 2.8, 1.1, "auxiliary sources (aux.*)\nvLLM VLM | API | traces", "#fde68a"),
    "coord": (6.9, 4.2, 2.9, 1.1, "rollout coordinator\nmerge, score (rewards),\nselect top-G", "#e9d5ff"),
    "adv": (10.6, 4.2, 2.4, 1.1, "group-relative\nadvantages\n(ekipl/algo)", "#f3f4f6"),
    "learner": (10.6, 1.9, 2.4, 1.2, "DeepSpeed ZeRO\nlearner ranks\n(Ray actors, learner.*)", "#bbf7d0"),
    "log": (6.9, 1.9, 2.9, 1.2, "metrics.jsonl, W&B,\ncheckpoints,\nexported policy", "#f3f4f6"),
}
ARROWS = [
    ("data", "policy", "n samples"),
    ("data", "aux", "k actions"),
    ("policy", "coord", ""),
    ("aux", "coord", "cached, prefetched"),
    ("coord", "adv", "groups of G"),
    ("adv", "learner", ""),
    ("learner", "policy", "weight sync"),
    ("learner", "log", ""),
]


def centre(name, side):
    x, y, w, h, *_ = BOXES[name]
    return {"r": (x + w, y + h / 2), "l": (x, y + h / 2), "t": (x + w / 2, y + h), "b": (x + w / 2, y)}[side]


def main():
    fig, ax = plt.subplots(figsize=(13.5, 5.4))
    for x, y, w, h, text, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#374151"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)
    sides = {
        ("data", "policy"): ("r", "l"), ("data", "aux"): ("r", "l"), ("policy", "coord"): ("r", "l"),
        ("aux", "coord"): ("r", "l"), ("coord", "adv"): ("r", "l"), ("adv", "learner"): ("b", "t"),
        ("learner", "policy"): ("t", "t"), ("learner", "log"): ("l", "r"),
    }
    for a, b, label in ARROWS:
        s, e = sides[(a, b)]
        start, end = centre(a, s), centre(b, e)
        style = "arc3"
        if (a, b) == ("learner", "policy"):  # around the others: right, up, along the top, down
            ax.plot([13.05, 13.25, 13.25, 4.6], [2.5, 2.5, 6.85, 6.85], color="#374151", lw=1.2)
            start, end = (4.6, 6.85), (4.6, 6.38)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#374151",
                                     connectionstyle=style))
        if label:
            mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
            if (a, b) == ("learner", "policy"):
                mx, my = 8.9, 6.88
            ax.text(mx, my + 0.12, label, ha="center", fontsize=8.5, color="#1f2937", style="italic")
    ax.set_xlim(0, 13.4)
    ax.set_ylim(1.6, 7.2)
    ax.axis("off")
    ax.set_title("One EKIPL step: external actions join the policy's samples before selection", fontsize=12)
    out = Path(__file__).resolve().parent / "dataflow.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
