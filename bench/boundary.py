"""The reasoning boundary (the paper's claim 2): pass@k for k = 1, 2, 4, 8, 16 on the held-out ID and
OOD splits, for the warm start and every arm's final policies of ``make learn``, with ``ekipl.eval``'s
unbiased estimator (n = 16 samples per problem at temperature 1, the rollout's token budget).

GRPO is known to narrow pass@k at large k (Yue et al., 2504.13837) while methods that add external
traces report widening it (RL-PLUS, AMPO): the curve per arm says which happens here. Each arm's
seeds are evaluated in one engine (weights loaded in turn) and kept under ``--out``
(``<arm>.json``): a rerun skips what is done. Writes its table into bench/LEARNING.md (between its
own markers) and the curves to bench/boundary.png.

    .venv/bin/python -m bench.boundary [--arms grpo ekipl ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.learning import DEFAULT_ARMS, HERE, mean_std

KS = [1, 2, 4, 8, 16]
BEGIN, END = "<!-- boundary:begin (bench/boundary.py writes this part) -->", "<!-- boundary:end -->"
WARM = "learn-qwen2-vl-sft"


def evaluate_arm(arm: str, models: dict[str, str], data: Path, out: Path, max_tokens: int) -> list[dict]:
    """``ekipl.eval`` on the arm's models (one engine), kept in ``out/<arm>.json``."""
    done = out / f"{arm}.json"
    if done.is_file():
        print(f"[boundary] {arm}: evaluated earlier, kept", flush=True)
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "ekipl.eval"]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    cmd += [
        "--split", f"id={data / 'test_id.json'}", "--split", f"ood={data / 'test_ood.json'}",
        "--k", *map(str, KS), "--max-tokens", str(max_tokens), "--out", str(out / arm),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{arm}: {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rows = json.loads((out / arm / "eval.json").read_text())
    done.write_text(json.dumps(rows, indent=1))
    return rows


def chance_rows(data: Path) -> list[dict]:
    """What guessing gives: k independent uniform draws from the split's own answers (a row whose
    draw is right with probability p: pass@k = 1 - (1 - p)^k), and always the split's most common
    answer (pass@1 only); bench/families.py's guessing, on the counting splits."""
    from bench.families import guess_scores

    rows = []
    for split in ("id", "ood"):
        uniform, majority, m = guess_scores(data, "counting", split)
        row = {"split": split, "model": f"uniform guess over the {m} answers"}
        row |= {f"pass@{k}": statistics.mean(1 - (1 - p) ** k for p in uniform) for k in KS}
        rows += [row, {"split": split, "model": "majority answer", "pass@1": statistics.mean(majority)}]
    return rows


def table(results: dict[str, list[dict]], chance: list[dict] | None = None) -> str:
    lines = [
        f"pass@k (unbiased, n = {max(KS)} samples per problem at temperature 1) on the held-out splits; "
        "mean ± std over the arm's seeds (the warm start: one model); the last rows are what guessing "
        "gives on the same splits.",
        "",
        "| arm | split | " + " | ".join(f"pass@{k}" for k in KS) + " |",
        "|---|---|" + "---|" * len(KS),
    ]
    for arm, rows in results.items():
        for split in ("id", "ood"):
            mine = [r for r in rows if r["split"] == split]
            cells = [mean_std([r[f"pass@{k}"] for r in mine]) for k in KS]
            lines.append(f"| {arm} | {split.upper()} | " + " | ".join(cells) + " |")
    for r in chance or []:
        cells = [f"{r[f'pass@{k}']:.3f}" if f"pass@{k}" in r else "-" for k in KS]
        lines.append(f"| {r['model']} | {r['split'].upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path, chance: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, split in zip(axes, ("id", "ood"), strict=True):
        for arm, rows in results.items():
            mine = [r for r in rows if r["split"] == split]
            mu = [statistics.mean(r[f"pass@{k}"] for r in mine) for k in KS]
            sd = [statistics.stdev([r[f"pass@{k}"] for r in mine]) if len(mine) > 1 else 0.0 for k in KS]
            ax.errorbar(KS, mu, yerr=sd, marker="o", ms=3, capsize=2, label=arm)
        guess = next(r for r in chance if r["split"] == split and "pass@2" in r)
        ax.plot(KS, [guess[f"pass@{k}"] for k in KS], "k--", lw=1, label=guess["model"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_title(f"held-out {split.upper()}: pass@k", fontsize=9)
        ax.set_xlabel("k", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from bench.learning import write_markdown

    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="outputs/learning", help="make learn's runs (--out there)")
    ap.add_argument("--out", default="outputs/boundary")
    ap.add_argument("--max-tokens", type=int, default=128, help="the rollout's budget in make learn")
    ap.add_argument("--md", default=str(HERE / "LEARNING.md"))
    ap.add_argument("--png", default=str(HERE / "boundary.png"))
    args = ap.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = runs / args.arms[0] / f"seed{args.seeds[0]}" / "data" / "counting"  # one data set for all
    results = {"warm start": evaluate_arm("warm", {"warm": WARM}, data, out, args.max_tokens)}
    for arm in args.arms:
        models = {f"{arm}-s{s}": str(runs / arm / f"seed{s}" / "policy") for s in args.seeds}
        missing = [p for p in models.values() if not (Path(p) / "model.safetensors").is_file()]
        if missing:
            print(f"[boundary] {arm}: no final policy at {missing}; left out", flush=True)
            continue
        results[arm] = evaluate_arm(arm, models, data, out, args.max_tokens)
    chance = chance_rows(data)
    text = table(results, chance)
    write_markdown(text, Path(args.md), BEGIN, END)
    plot(results, Path(args.png), chance)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
