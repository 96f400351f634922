"""`make demo`: the main job on the embedded default, local Ray on CPU.

It runs the ``cpu_demo`` preset through the whole distributed path (synthetic counting data, tiny
local models, a policy vLLM engine in a Ray actor, two auxiliary sources -- a second tiny VLM in
its own vLLM actor and the recorded CoT traces --, 2 DeepSpeed ZeRO ranks on gloo, weight sync
after every step, W&B offline), then prints a per-step table from ``metrics.jsonl``.
It ends with an evaluation table (``ekipl.eval``: the trained policy and the base model on the ID and
OOD test splits) and a PNG of the curves. Extra arguments are Hydra overrides, e.g.
``python -m ekipl.demo trainer.steps=8``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

EVAL_PROBLEMS = 8

COLUMNS = [
    ("step", "step", "{:.0f}"),
    ("policy reward", "reward/policy/mean", "{:.2f}"),
    ("aux_b reward", "reward/aux_b/mean", "{:.2f}"),
    ("trace reward", "reward/dataset/mean", "{:.2f}"),
    ("aux share", "select/ratio/dataset", "{:.2f}"),
    ("aux win rate", "select/aux_win_rate", "{:.2f}"),
    ("pg loss", "actor/pg_loss", "{:+.3f}"),
    ("entropy", "actor/entropy", "{:.3f}"),
    ("rollout s", "timing/rollout", "{:.2f}"),
    ("aux wait s", "timing/aux_wait", "{:.2f}"),
    ("update s", "timing/update", "{:.2f}"),
    ("sync s", "timing/weight_sync", "{:.2f}"),
    ("step s", "timing/step", "{:.2f}"),
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
    from ekipl.tasks.sample import DataError
    from ekipl.train import run

    register()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose(config_name="config", overrides=["+experiment=cpu_demo", *argv])
    out = Path(cfg.trainer.output_dir)
    if out.exists() and cfg.trainer.resume == "never":  # the demo's own directory: start afresh
        shutil.rmtree(out)
        print(f"[demo] replaced the previous demo run in {out}")
    t0 = time.time()
    try:
        summary = run(cfg)
    except (ConfigError, DataError) as e:
        print(f"ekipl: error: {e}", file=sys.stderr)
        return 2
    rows = read_metrics(out / "metrics.jsonl")
    steps, skipped = summary["steps"], summary["skipped_steps"]
    print(f"\n[demo] {steps} EKIPL steps ({skipped} skipped) in {time.time() - t0:.0f}s")
    print(table(rows[-(steps + skipped) :]))
    from ekipl.plot import plot_runs

    png = plot_runs([out], out / "curves.png")
    print(f"\n[demo] metrics: {out / 'metrics.jsonl'}; curves: {png}")
    print(f"[demo] W&B offline run under {out / 'wandb'} (upload later with `wandb sync`)")
    print(f"[demo] trained policy (transformers/vLLM loadable): {summary['export']}")

    # The evaluation table: the trained policy against the base model on the ID and OOD splits.
    from ekipl.eval import evaluate, write
    from ekipl.eval import table as eval_table
    from ekipl.tasks.loader import load_task_file
    from ekipl.train import resolve_model

    t1 = time.time()
    data = out / "data" / cfg.data.synthetic_task
    splits = {s: list(load_task_file(data / f"test_{s}.json"))[:EVAL_PROBLEMS] for s in ("id", "ood")}
    models = {"trained": summary["export"], "base": resolve_model(cfg.model.path, cfg.model.seed)}
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the in-process engine's per-call warnings
    rows = evaluate(
        models, splits, k=4, temperature=1.0, max_tokens=cfg.rollout.max_tokens, dtype=cfg.model.dtype
    )
    js, md = write(rows, out / "eval")
    print(
        f"\n[demo] evaluation ({EVAL_PROBLEMS} problems per split, greedy + 4 samples) "
        f"in {time.time() - t1:.0f}s"
    )
    print(eval_table(rows))
    print(f"[demo] evaluation table: {md} and {js}")
    print(
        "[demo] (random-weight tiny models answer at chance: these numbers show the pipeline, not the method)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
