"""Weight sync (learner ZeRO ranks -> running vLLM engine) against the in-memory copy floor.

For each model size it trains nothing: it times ``LearnerGroup.sync_weights`` (bucketed gather on
the ranks, one safetensors file in /dev/shm, one ``collective_rpc`` into the engine) and, in the
same run, the floor: copying the same tensors once in memory. Prints a Markdown table of medians.

    .venv/bin/python -m bench.weight_sync [--repeats 3] [--models tiny-qwen2 bench-qwen2-25m ...]
"""

from __future__ import annotations

import argparse
import statistics
import time


def copy_floor(state: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copies = {k: v.clone() for k, v in state.items()}
        times.append(time.perf_counter() - t0)
        del copies
    return statistics.median(times)


def run(models: list[str], repeats: int, world_size: int, zero_stage: int) -> list[dict]:
    import ray
    import torch

    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.engines import vllm_backend as vb
    from ekipl.engines.policy import PolicyEngine
    from ekipl.learner.config import LearnerConfig
    from ekipl.learner.group import LearnerGroup
    from ekipl.models.tiny import build_tiny

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for name in models:
            path = str(build_tiny(name))
            group = LearnerGroup(
                path, LearnerConfig(world_size=world_size, zero_stage=zero_stage), ObjectiveConfig()
            )
            engine = (
                ray.remote(PolicyEngine)
                .options(num_cpus=1)
                .remote(vb.EngineSpec(model=path, dtype="float32", enable_weight_sync=True))
            )
            ray.get(engine.ready.remote())
            state = group.state_dict()
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            params = sum(t.numel() for t in state.values())
            group.sync_weights([engine])  # warm-up
            syncs = [group.sync_weights([engine]) for _ in range(repeats)]
            sync = statistics.median(s["timing/weight_sync"] for s in syncs)
            export = statistics.median(s["timing/weight_export"] for s in syncs)
            floor = copy_floor(state, repeats)
            rows.append(
                dict(model=name, params=params, mb=nbytes / 1e6, sync=sync, export=export, floor=floor)
            )
            group.shutdown()
            ray.kill(engine)
            del state
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    finally:
        ray.shutdown()
    return rows


def table(rows: list[dict], world_size: int, zero_stage: int) -> str:
    lines = [
        f"### Weight sync vs in-memory copy floor "
        f"({world_size} ZeRO-{zero_stage} ranks -> 1 vLLM engine, CPU, median)",
        "",
        "| model | params | MB | sync s | of which export s | floor s | sync / floor | s per 100 MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['mb']:.1f} | {r['sync']:.3f} | "
            f"{r['export']:.3f} | {r['floor']:.4f} | {r['sync'] / r['floor']:.1f}x | "
            f"{100 * r['sync'] / r['mb']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny-qwen2", "bench-qwen2-25m", "bench-qwen2-100m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=3)
    args = ap.parse_args(argv)
    rows = run(args.models, args.repeats, args.world_size, args.zero_stage)
    print(table(rows, args.world_size, args.zero_stage))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
