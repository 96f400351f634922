"""One-step-off-policy rollout (``rollout.one_step_off``) against the on-policy step, side by side.

    .venv/bin/python -m bench.perf.one_step_off [--repeats 3] [--model bench-qwen2-75m]

The TRL comparison's workload (``bench.perf.trl_compare``: a random-weight text Qwen2, G=8 x 2 prompts
x 64 forced tokens, β=0, AdamW, 1 ZeRO-2 learner rank) through the trainer's own step function, in
three set-ups: on-policy with the engine on every core (the default), one-step-off with the engine
on half the cores (what the trainer gives it with ``one_step_off`` on a CPU machine: the learner
computes beside it), and one-step-off with the engine on every core (to show why the split). One
learner group serves all three; each set-up starts its own engine. Median of ``--repeats`` steps
after one warm-up step (one-step-off's first step is on-policy). Not part of ``make bench`` (it
takes ~7 minutes at 75M); its figures are in bench/RESULTS.md.

"rollout" is the time the step waits for the policy's actions (with one-step-off: what is left of
the generation started during the previous update); "sync" includes waiting for that generation
to finish, since the engine runs it before it loads the new weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from bench.perf.trl_compare import PROMPTS, TOKENS, G, ekipl_config, prompts, run_steps

PARTS = [
    ("rollout", ("timing/rollout",)),
    ("update", ("timing/logprob", "timing/update")),
    ("sync", ("timing/weight_sync",)),
    ("total", ("timing/step",)),
]


def measure(model: str, repeats: int) -> list[tuple[str, dict]]:
    import ray

    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.group import LearnerGroup
    from ekipl.models import hf
    from ekipl.rollout.policy import PolicyRouter

    samples = prompts(16)
    processor = hf.load_processor(model)
    cores = os.cpu_count() or 1
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        base = ekipl_config(1)
        learner = LearnerGroup(model, base.learner, base.algorithm)
        learner.ready()
        results = []
        for label, off, share in (
            (f"on-policy, engine on {cores} of {cores} cores", False, 1),
            (f"one-step-off, engine on {max(1, cores // 2)} of {cores}", True, 2),
            (f"one-step-off, engine on {cores} of {cores}", True, 1),
        ):
            router = PolicyRouter(vb.EngineSpec(model=model, dtype="float32", seed=0), engine_share=share)
            router.ready()
            rows = run_steps(ekipl_config(1, one_step_off=off), samples, router, learner, processor, repeats)
            for a in router.actors:
                ray.kill(a)
            cell = {name: statistics.median(sum(r[k] for k in keys) for r in rows) for name, keys in PARTS}
            print(f"  {label}: {cell['total']:.2f}s per step", file=sys.stderr, flush=True)
            results.append((label, cell))
        learner.shutdown()
        return results
    finally:
        ray.shutdown()


def table(results: list[tuple[str, dict]]) -> str:
    head = " | ".join(f"{name} s" for name, _ in PARTS)
    lines = [f"| set-up | {head} | tok/s | vs on-policy |", "|---|" + "---|" * (len(PARTS) + 2)]
    base = results[0][1]["total"]
    for label, c in results:
        cells = " | ".join(f"{c[name]:.2f}" for name, _ in PARTS)
        lines.append(
            f"| {label} | {cells} | {G * PROMPTS * TOKENS / c['total']:.0f} | {c['total'] / base:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="bench-qwen2-75m")
    args = p.parse_args(argv)
    from ekipl.models.tiny import build_tiny

    results = measure(str(build_tiny(args.model)), args.repeats)
    print(f"{args.model}, G={G} x {PROMPTS} prompts x {TOKENS} forced tokens, 1 ZeRO-2 learner rank\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
