"""The LoRA arm's learning rate, fixed on the train split only (issue: never tune on a test split).

For each candidate rate, one short EKIPL run with LoRA (rank 8, alpha 16, the arm's settings) from
the arm's warm start, on a seed none of the arms uses, with validation off: the held-out splits are
never generated into a score. The pick is the rate with the highest mean training reward of the
policy's own samples (``reward/policy/mean``: accuracy + format, on train prompts) over the last
``--window`` steps; a run whose format collapses scores low by that measure, so it is never picked.
Writes ``bench/results/lora_pilot.json``; bench/learn/learning.py's ``ekipl_lora`` arm reads its pick.
Finished pilot runs are kept, as in ``make learn``.

    .venv/bin/python -m bench.learn.lora_pilot [--lrs 1e-4 3e-4 1e-3] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.learn.learning import HERE, LORA, load_rows, run_arm

PILOT_SEED = 100  # not one of make learn's seeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", nargs="+", default=["1.0e-4", "3.0e-4", "1.0e-3"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--out", default="outputs/lora_pilot")
    ap.add_argument("--json", default=str(HERE / "results" / "lora_pilot.json"))
    args = ap.parse_args(argv)
    base = LORA
    no_val = ["trainer.eval_every=0", "trainer.eval_before_train=false"]
    results = []
    for lr in args.lrs:
        out = Path(args.out) / f"lr{lr}"
        took = run_arm("ekipl_lora", PILOT_SEED, out, args.steps, no_val, [*base, f"learner.lr={lr}"])
        rows = load_rows(out / "ekipl_lora" / f"seed{PILOT_SEED}")
        assert not any(k.startswith("val/") for r in rows for k in r), "the pilot must not validate"
        rew = [r["reward/policy/mean"] for r in rows if "reward/policy/mean" in r]
        fmt = [r["reward/policy/format"] for r in rows if "reward/policy/format" in r]
        results.append(
            {
                "lr": float(lr),
                "train_reward_first": statistics.mean(rew[: args.window]),
                "train_reward_last": statistics.mean(rew[-args.window :]),
                "train_format_last": statistics.mean(fmt[-args.window :]),
                "minutes": took / 60,
            }
        )
        print(f"[pilot] lr {lr}: {results[-1]}", flush=True)
    best = max(results, key=lambda r: r["train_reward_last"])
    report = {
        "rule": f"max mean reward/policy/mean over the last {args.window} of {args.steps} train steps",
        "seed": PILOT_SEED,
        "overrides": base,
        "runs": results,
        "picked_lr": best["lr"],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[pilot] picked learner.lr={best['lr']} -> {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
