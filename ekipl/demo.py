"""`make demo`: does external guidance help? GRPO and EKIPL side by side, on local Ray on CPU.

Both arms start from the same CoT-SFT warm start (``learn-qwen2-vl-sft``, and the stronger
``learn-qwen2-vl-aux`` that EKIPL asks; ``ekipl.warm`` builds both once, about 5 minutes on 2 cores,
then caches them under ``$EKIPL_CACHE``) and train 60 steps on the synthetic counting task through
the whole path: a policy vLLM engine in a Ray actor, the auxiliary model in its own, the recorded
traces, a DeepSpeed learner, weight sync after every step, validation every 10 steps, W&B offline.
They are seed 0 of ``make learn``'s GRPO and EKIPL counting runs, overrides for overrides.

It ends with both arms' curves in one picture and the answer: greedy accuracy of the warm start,
GRPO and EKIPL on the same 1,000 held-out problems, and EKIPL's lead over GRPO with the standard
error of the paired difference. When one seed in ten minutes cannot separate the arms it says so
and points at ``make learn`` (3 seeds per arm, bench/LEARNING.md). Extra arguments are Hydra
overrides for both arms, e.g. ``python -m ekipl.demo trainer.steps=20``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

OUT = Path("outputs/demo")
FINAL_PROBLEMS = 1000
BASE = [
    "+experiment=learn_counting",  # make learn's counting preset (conf/experiment/learn_counting.yaml)
    "trainer.seed=0",
    "trainer.steps=60",
    "trainer.eval_every=10",
    "trainer.log_samples_every=5",
    "logger.mode=offline",
]
ARMS = {"GRPO": ["algorithm=grpo", "aux=none"], "EKIPL": []}

COLUMNS = [
    ("step", "step", "{:.0f}"),
    ("reward", "reward/policy/mean", "{:.2f}"),
    ("policy acc.", "reward/policy/accuracy", "{:.2f}"),
    ("external share", "select/ratio/external", "{:.2f}"),
    ("val ID acc.", "val/id/accuracy", "{:.3f}"),
    ("val OOD acc.", "val/ood/accuracy", "{:.3f}"),
    ("entropy", "actor/entropy", "{:.3f}"),
    ("step s", "timing/step", "{:.1f}"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = [
        "| " + " | ".join(fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS) + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def _external_share(row: dict) -> dict:
    """The share of the selected actions that came from outside the policy (every non-policy source)."""
    shares = [v for k, v in row.items() if k.startswith("select/ratio/") and k != "select/ratio/policy"]
    return {**row, "select/ratio/external": sum(shares)} if "select/ratio/policy" in row else row


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same problems and its standard error (the sample std of the
    per-problem differences over sqrt(n)): the two models' agreement on easy and hard problems
    cancels, which two independent binomial errors would count twice."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def verdict(diff: float, se: float) -> str:
    pts, spts = 100 * diff, 100 * se
    z = diff / se if se > 0 else float("inf")
    if z >= 2:
        return (
            f"EKIPL leads GRPO by {pts:+.1f} ± {spts:.1f} points ({z:.1f} standard errors): on this seed the "
            "external actions helped. One seed says nothing of the spread across seeds: make learn runs 3 "
            "per arm (bench/LEARNING.md)."
        )
    if z <= -2:
        return (
            f"GRPO leads EKIPL by {-pts:.1f} ± {spts:.1f} points ({-z:.1f} standard errors) on this seed: "
            "guidance did not help here. make learn (3 seeds per arm, bench/LEARNING.md) says whether that "
            "holds beyond one seed."
        )
    return (
        f"EKIPL - GRPO = {pts:+.1f} ± {spts:.1f} points ({z:.1f} standard errors): one seed of 60 steps "
        "cannot separate the arms. The answer needs more seeds: make learn (3 seeds per arm, about 2 "
        "hours on 2 cores; bench/LEARNING.md)."
    )


def train_arms(argv: list[str]) -> dict[str, dict]:
    """Both arms, one after the other: each arm's run summary and metrics rows."""
    from ekipl.cluster import compose
    from ekipl.metrics import read_metrics
    from ekipl.train import run

    out = {}
    for arm, overrides in ARMS.items():
        run_dir = OUT / arm.lower()
        cfg = compose([*BASE, *overrides, f"trainer.output_dir={run_dir}", *argv])
        if run_dir.exists() and cfg.trainer.resume == "never":  # the demo's own directory: afresh
            shutil.rmtree(run_dir)
        t0 = time.time()
        summary = run(cfg)
        rows = [_external_share(r) for r in read_metrics(run_dir / "metrics.jsonl")]
        done = f"{summary['steps']} steps ({summary['skipped_steps']} skipped)"
        print(f"\n[demo] {arm}: {done} in {time.time() - t0:.0f}s")
        print(table([r for r in rows if "val/id/accuracy" in r or r["step"] % 10 == 0]))
        out[arm] = {"summary": summary, "dir": run_dir, "cfg": cfg}
    return out


def final_scores(arms: dict[str, dict], warm: str) -> tuple[list[dict], dict[str, list[float]]]:
    """Greedy accuracy of the warm start and both arms on the same FINAL_PROBLEMS held-out problems,
    and each model's per-problem correctness."""
    from ekipl.eval import evaluate, write
    from ekipl.eval import table as eval_table
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.synth import make_split

    cfg = arms["GRPO"]["cfg"]
    path = make_split(
        cfg.data.synthetic_task, "test_id", FINAL_PROBLEMS, OUT / "data", cfg.data.synthetic_seed
    )
    samples = list(load_task_file(path))
    models = {"warm start": warm, **{arm: a["summary"]["export"] for arm, a in arms.items()}}
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the in-process engine's start-up chatter
    records: dict = {}
    rows = evaluate(
        models,
        {"id": samples},
        k=1,
        max_tokens=cfg.rollout.max_tokens,
        dtype=cfg.model.dtype,
        records=records,
        greedy_only={"id"},
    )
    write(rows, OUT / "eval", records)
    print(eval_table(rows))
    correct = {m: [r["greedy"]["accuracy"] for r in records[(m, "id")]] for m in models}
    return rows, correct


def main(argv: list[str]) -> int:
    from ekipl.config import ConfigError
    from ekipl.modelref import resolve_model
    from ekipl.tasks.sample import DataError

    t0 = time.time()
    try:
        warm = resolve_model("learn-qwen2-vl-sft", 0)  # stage 1, CoT-SFT (cached after the first run)
        resolve_model("learn-qwen2-vl-aux", 0)  # EKIPL's stronger auxiliary model
        print(f"[demo] warm starts ready in {time.time() - t0:.0f}s")
        arms = train_arms(argv)
    except (ConfigError, DataError) as e:
        print(f"ekipl: error: {e}", file=sys.stderr)
        return 2
    from ekipl.plot import plot_runs

    png = plot_runs([a["dir"] for a in arms.values()], OUT / "curves.png")
    print(f"\n[demo] both arms' curves: {png}; W&B offline runs under {OUT}/*/wandb")
    t1 = time.time()
    print(f"\n[demo] greedy accuracy on the same {FINAL_PROBLEMS} held-out (ID) problems:")
    _, correct = final_scores(arms, warm)
    diff, se = paired_difference(correct["EKIPL"], correct["GRPO"])
    print(f"[demo] evaluated in {time.time() - t1:.0f}s; completions under {OUT / 'eval'}")
    print(f"\n[demo] {verdict(diff, se)}")
    print(f"[demo] done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
