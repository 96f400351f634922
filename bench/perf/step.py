"""Where an EKIPL step's time goes, and what auxiliary sources cost.

    .venv/bin/python -m bench.perf.step [--repeats 5] [--groups 4 8 16]

One set of actors (a policy vLLM engine -- two, in fact: one alone with every core for the rows
without auxiliary sources, one sharing the cores with the aux engine, as the trainer sets them up
on CPU --, an auxiliary vLLM engine on the second tiny VLM, the recorded-trace source, 2 ZeRO-2
learner ranks on gloo) runs the trainer's own step function
(``ekipl.train.StepParts.run``: prefetch -> rollout -> rewards/selection -> advantages -> update -> sync)
for every G in ``--groups`` with 0, 1 and 2 auxiliary sources (the aux VLM samples k = G/4 per
prompt), 2 prompts per step. Each cell is the median of ``--repeats`` steps after one warm-up step.
The overlap column is the step time over the same G's step time with no auxiliary source (goal
<= 1.1x: prefetch hides auxiliary generation). The one learner trains at lr 1e-6 throughout
(cpu_demo's 1e-4 makes it diverge within the run's ~70 steps, and skipped steps skip the sync).

``--guidance``: what on-demand guidance adds to a step (gated EKIPL asks its sources only after the
policy's samples are scored, so prefetch cannot hide them). For G = 4 (``--groups``' first), with
the recorded traces alone and with the aux VLM alone, the step with prefetched actions against the
same step with every prompt asked on demand (``rollout.gate_threshold=1``: the gate's worst case,
every prompt failed); the ratio column is on demand over prefetched. The third row per source
starts the requests at the batch's prefetch for the prompts that needed guidance at their last visit
(``rollout.gate_prefetch``): 8 prompts, an untimed first epoch, then every timed step revisits.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

GUIDED_PROMPTS = 8
PARTS = [
    ("aux wait", "timing/aux_wait"),
    ("rollout", "timing/rollout"),
    ("reward", "timing/reward"),
    ("log-prob", "timing/logprob"),
    ("update", "timing/update"),
    ("sync", "timing/weight_sync"),
    ("total", "timing/step"),
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--guidance", action="store_true", help="prefetched against on-demand guidance")
    args = p.parse_args(argv)

    import tempfile

    import ray

    from ekipl.cluster import compose
    from ekipl.config import to_run_config
    from ekipl.data import ImageCheck, Sampler, load_data
    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.group import LearnerGroup
    from ekipl.modelref import resolve_model
    from ekipl.models import hf
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.rollout.policy import PolicyRouter
    from ekipl.rollout.sources import make_source
    from ekipl.train import StepParts

    out = Path(tempfile.mkdtemp(prefix="ekipl-bench-step-"))
    base = ["+experiment=cpu_demo", "data.synthetic_size=32", f"trainer.output_dir={out}", "learner.lr=1e-6"]
    run_cfg, source_cfgs = to_run_config(compose(base))
    data = load_data(run_cfg, out)
    model = resolve_model(run_cfg.model.path)
    source_cfgs = [  # copies with the engines' model directory and the bench's length (configs are read)
        dataclasses.replace(s, model=resolve_model(s.model), max_tokens=args.max_tokens)
        if s.kind == "vllm"
        else s
        for s in source_cfgs
    ]
    processor = hf.load_processor(model)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # As the trainer does on CPU: alone, the policy engine has every core; with an aux engine
        # generating beside it (prefetch), the two split them.
        spec = vb.EngineSpec(model=model, dtype="float32", seed=0)
        alone = PolicyRouter(spec, replicas=1, engine_share=1)
        shared = PolicyRouter(vb.EngineSpec(**vars(spec)), replicas=1, engine_share=2)
        sources = {s.name: make_source(s, engine_share=2) for s in source_cfgs}
        learner = LearnerGroup(model, run_cfg.learner, run_cfg.algorithm)
        alone.ready()
        shared.ready()
        for s in sources.values():
            if hasattr(s, "ready"):
                s.ready()
        if args.guidance:
            g, k = args.groups[0], max(1, args.groups[0] // 4)
            cells = [
                (g, f"{name}, {mode}", [sources[name]], router, [gate])
                for name in ("dataset", "aux_b")
                for mode, gate, router in (
                    ("prefetched", "rollout.gate_threshold=null", shared),
                    ("on demand", "rollout.gate_threshold=1.0", shared),
                    ("on demand, started at the last visit", "rollout.gate_threshold=1.0", shared),
                )
            ]
            cells = [
                (*c[:4], [*c[4], "rollout.gate_prefetch=true"] if c[1].endswith("last visit") else c[4])
                for c in cells
            ]
            sources["aux_b"].cfg.k = k
        else:
            source_sets = {0: [], 1: [sources["aux_b"]], 2: [sources["aux_b"], sources["dataset"]]}
            cells = [
                (g, n_aux, srcs, alone if n_aux == 0 else shared, [] if n_aux else ["aux.aux_b=null"])
                for g in args.groups
                for n_aux, srcs in source_sets.items()
            ]
        results = []
        for g, label, srcs, router, extra in cells:
            if not args.guidance:
                sources["aux_b"].cfg.k = max(1, g // 4)  # a source samples with its own config's k
            cfg, _ = to_run_config(
                compose(
                    [
                        *base,
                        f"rollout.n={g}",
                        f"rollout.group_size={g}",
                        f"rollout.max_tokens={args.max_tokens}",
                        "rollout.drop_tied=false",  # every step trains, so every part is timed
                        f"aux.aux_b.k={max(1, g // 4)}",
                        *extra,
                    ]
                )
            )
            coord = RolloutCoordinator(cfg.rollout, router, srcs, processor, cache=None)
            # --guidance: 8 prompts, so every timed step revisits prompts of the untimed first epoch
            sampler = Sampler(
                GUIDED_PROMPTS if args.guidance else len(data), seed=g * 10 + len(srcs), shuffle=True
            )
            parts = StepParts(cfg, data, sampler, ImageCheck(False), coord, learner, router, processor)
            warm = GUIDED_PROMPTS // 2 if args.guidance else 1  # 2 prompts per step
            steps = []
            for step in range(1, args.repeats + warm + 1):
                m = parts.run(step)
                if m.get("actor/skipped_step") or m.get("trainer/skipped_step"):
                    raise RuntimeError(f"G={g}, {label}: step {step} was skipped (its sync untimed)")
                if step > warm:  # the first step(s) warm up the prefetch pipeline
                    steps.append(m)
                elif step == warm:
                    before = m
            coord._pool.shutdown(wait=True)
            row = {"G": g, "aux": label, "served_early": served_early(before, steps[-1])}
            for _, key in PARTS:
                row[key] = statistics.median(m.get(key, 0.0) for m in steps)
            tokens = statistics.median(m["rollout/policy_tokens"] for m in steps)
            row["tokens/s"] = tokens / row["timing/step"]
            results.append(row)
            print(f"  G={g} aux={label}: {row['timing/step']:.2f}s per step", file=sys.stderr, flush=True)
        print(guidance_table(results) if args.guidance else table(results))
    finally:
        ray.shutdown()
    return 0


def table(results: list[dict]) -> str:
    base = {r["G"]: r["timing/step"] for r in results if r["aux"] == 0}
    head = (
        "| G | aux sources | "
        + " | ".join(name + " s" for name, _ in PARTS)
        + " | policy tokens/s | vs 0 aux |"
    )
    sep = "|---|---|" + "---|" * (len(PARTS) + 2)
    lines = [head, sep]
    for r in results:
        cells = [f"{r[key]:.3f}" for _, key in PARTS]
        ratio = r["timing/step"] / base[r["G"]] if r["G"] in base else float("nan")
        lines.append(
            f"| {r['G']} | {r['aux']} | " + " | ".join(cells) + f" | {r['tokens/s']:.0f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def served_early(first: dict, last: dict) -> float | None:
    """The share of the timed steps' guided prompts whose answers were started at the prefetch
    (cumulative counters, after the warm-up against after the last step)."""
    if "aux/gate_prefetched" not in last:
        return None
    early = last["aux/gate_prefetched"] - first["aux/gate_prefetched"]
    late = last["aux/gate_on_demand"] - first["aux/gate_on_demand"]
    return early / max(1.0, early + late)


def guidance_table(results: list[dict]) -> str:
    head = (
        "| G | source, guidance | "
        + " | ".join(name + " s" for name, _ in PARTS)
        + " | vs prefetched | guided prompts started early |"
    )
    lines = [head, "|---|---|" + "---|" * (len(PARTS) + 2)]
    base = {r["aux"].split(",")[0]: r["timing/step"] for r in results if r["aux"].endswith("prefetched")}
    for r in results:
        cells = [f"{r[key]:.3f}" for _, key in PARTS]
        ratio = r["timing/step"] / base[r["aux"].split(",")[0]]
        early = "-" if r["served_early"] is None else f"{r['served_early']:.0%}"
        lines.append(f"| {r['G']} | {r['aux']} | " + " | ".join(cells) + f" | {ratio:.2f}x | {early} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
