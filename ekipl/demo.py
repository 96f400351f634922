"""`make demo`: the main job, on the embedded default: local Ray on CPU, and a policy that learns.

Reason-RFT's two stages on the synthetic counting task, through the whole distributed path:

1. **CoT-SFT warm start**: the ``learn-qwen2-vl`` policy fine-tuned on the recorded traces
   (``ekipl.warm``; built once, about 3 minutes on 2 cores, then cached under ``$EKIPL_CACHE``);
2. **EKIPL**: the ``learn_counting`` preset with the recorded CoT traces as the auxiliary source (a
   policy vLLM engine in a Ray actor, 2 DeepSpeed ZeRO-2 learner ranks on gloo, weight sync after
   every step, held-out validation every few steps, W&B offline, checkpoints).

It prints the per-step table, draws the curves (``curves.png``: reward, held-out accuracy, the
action-source ratio, lengths, the update's health), and ends with the evaluation table
(``ekipl.eval``): the trained policy against the warm start it began from, on the ID and OOD test
splits. ``make learn`` runs the full comparison (GRPO, EKIPL, EKIPL-shaped, seeds:
bench/LEARNING.md). Extra arguments are Hydra overrides, e.g. ``python -m ekipl.demo trainer.steps=8``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

EVAL_PROBLEMS = 64
DEMO = [
    "+experiment=learn_counting",
    "aux.aux_model=null",  # the recorded traces only: no second warm start to build
    "learner.world_size=2",  # ZeRO-2 over 2 gloo ranks, as on a cluster
    "learner.micro_batch_size=4",
    "trainer.steps=48",
    # the whole held-out splits (128 problems each: a binomial std of about 4 points) every 12 steps;
    # 32 problems every 8 moved 0.34, 0.28, 0.31, 0.41, ... from noise alone
    "trainer.eval_every=12",
    "trainer.eval_limit=0",
    "trainer.save_every=24",
    "trainer.log_samples_every=8",
    "trainer.output_dir=outputs/demo",
]

COLUMNS = [
    ("step", "step", "{:.0f}"),
    ("policy reward", "reward/policy/mean", "{:.2f}"),
    ("policy acc.", "reward/policy/accuracy", "{:.2f}"),
    ("trace share", "select/ratio/dataset", "{:.2f}"),
    ("aux win rate", "select/aux_win_rate", "{:.2f}"),
    ("val ID acc.", "val/id/accuracy", "{:.2f}"),
    ("val OOD acc.", "val/ood/accuracy", "{:.2f}"),
    ("length", "length/policy/mean", "{:.0f}"),
    ("truncated", "length/policy/truncated_frac", "{:.2f}"),
    ("entropy", "actor/entropy", "{:.3f}"),
    ("grad norm", "actor/grad_norm", "{:.2f}"),
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


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from ekipl.config import ConfigError, register
    from ekipl.metrics import read_metrics
    from ekipl.runtime import resolve_model
    from ekipl.tasks.sample import DataError
    from ekipl.train import run

    register()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose(config_name="config", overrides=[*DEMO, *argv])
    out = Path(cfg.trainer.output_dir)
    if out.exists() and cfg.trainer.resume == "never":  # the demo's own directory: start afresh
        shutil.rmtree(out)
        print(f"[demo] replaced the previous demo run in {out}")
    t0 = time.time()
    warm = resolve_model(cfg.model.path, cfg.model.seed)  # stage 1, CoT-SFT (cached after the first run)
    print(f"[demo] warm start (CoT-SFT) ready in {time.time() - t0:.0f}s: {warm}")
    t1 = time.time()
    try:
        summary = run(cfg)
    except (ConfigError, DataError) as e:
        print(f"ekipl: error: {e}", file=sys.stderr)
        return 2
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0 or "val/id/accuracy" in r]
    steps, skipped = summary["steps"], summary["skipped_steps"]
    print(f"\n[demo] {steps} EKIPL steps ({skipped} skipped) in {time.time() - t1:.0f}s")
    print(table(rows))
    from ekipl.plot import plot_runs

    png = plot_runs([out], out / "curves.png")
    print(
        f"\n[demo] metrics: {out / 'metrics.jsonl'}; curves: {png}; sampled groups: {out / 'samples.jsonl'}"
    )
    print(f"[demo] W&B offline run under {out / 'wandb'} (upload later with `wandb sync`)")
    print(f"[demo] trained policy (transformers/vLLM loadable): {summary['export']}")

    # The evaluation table: the trained policy against the warm start it began from.
    from ekipl.eval import evaluate, write
    from ekipl.eval import table as eval_table
    from ekipl.tasks.loader import load_task_file

    t2 = time.time()
    data = out / "data" / cfg.data.synthetic_task
    splits = {s: list(load_task_file(data / f"test_{s}.json"))[:EVAL_PROBLEMS] for s in ("id", "ood")}
    models = {"trained": summary["export"], "warm start": warm}
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the in-process engine's start-up chatter
    records: dict = {}
    rows = evaluate(
        models,
        splits,
        k=4,
        temperature=1.0,
        max_tokens=cfg.rollout.max_tokens,
        dtype=cfg.model.dtype,
        records=records,
    )
    js, md = write(rows, out / "eval", records)
    print(
        f"\n[demo] evaluation ({EVAL_PROBLEMS} problems per split, greedy + 4 samples) "
        f"in {time.time() - t2:.0f}s"
    )
    print(eval_table(rows))
    print(f"[demo] evaluation table: {md} and {js}; completions under {out / 'eval' / 'completions'}")
    print(f"[demo] done in {time.time() - t0:.0f}s. The GRPO vs EKIPL comparison over seeds: make learn")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
