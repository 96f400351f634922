"""Weight sync (learner ZeRO ranks -> running vLLM engine) against the in-memory copy floor.

For each model size it trains nothing: it times ``LearnerGroup.sync_weights`` (rank 0 rewrites its
shared-memory safetensors buffer in place, gathering bucket by bucket under ZeRO-3, then one
``collective_rpc`` has the engine reload from it) and, in the same run, the floor: copying the same
tensors once into memory already allocated. Every model runs under ZeRO-2 (the trainer's default:
rank 0 holds the full weights); ``--zero3-models`` also under ZeRO-3 (the weights are gathered),
against the same engine (not in ``make bench``, to keep it under 15 minutes). Prints a Markdown
table of medians.

    .venv/bin/python -m bench.perf.weight_sync [--repeats 3] [--models tiny-qwen2 ...] [--zero3-models ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def copy_floor(state: dict, repeats: int, device: str | None = None) -> float:
    """Copying every tensor once into memory that is already allocated and touched (a warm-up copy
    first): the bytes have to move at least this once. ``device``: where the copies go (default:
    where each tensor is; "cpu" for a GPU learner's weights, which a sync must bring to the host)."""
    dst = {k: torch.empty_like(v, device=device or v.device) for k, v in state.items()}
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for k, v in state.items():
            dst[k].copy_(v)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run(models: list[str], repeats: int, world_size: int, zero3_models: list[str]) -> list[dict]:
    import ray

    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.config import LearnerConfig
    from ekipl.learner.group import LearnerGroup
    from ekipl.models.tiny import build_tiny
    from ekipl.rollout.policy import PolicyRouter

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for name in models:
            path = str(build_tiny(name))
            # Started as the trainer starts its policy engine (same actor options and threads).
            router = PolicyRouter(vb.EngineSpec(model=path, dtype="float32"), replicas=1)
            router.ready()
            engine = router.actors[0]
            for stage in (2, 3) if name in zero3_models else (2,):
                group = LearnerGroup(
                    path, LearnerConfig(world_size=world_size, zero_stage=stage), ObjectiveConfig()
                )
                state = group.state_dict()
                group.sync_weights([engine])  # warm-up: the first sync lays out the buffer
                syncs = [group.sync_weights([engine]) for _ in range(repeats)]
                rows.append(
                    dict(
                        model=name,
                        stage=stage,
                        params=sum(t.numel() for t in state.values()),
                        mb=sum(t.numel() * t.element_size() for t in state.values()) / 1e6,
                        sync=statistics.median(s["timing/weight_sync"] for s in syncs),
                        export=statistics.median(s["timing/weight_export"] for s in syncs),
                        floor=copy_floor(state, repeats),
                    )
                )
                group.shutdown()
                del state
            ray.kill(engine)
    finally:
        ray.shutdown()
    return rows


def table(rows: list[dict], world_size: int) -> str:
    lines = [
        f"### Weight sync vs in-memory copy floor ({world_size} learner ranks -> 1 vLLM engine, CPU, median)",
        "",
        "| model | params | MB | ZeRO | sync s | learner export s | engine load s | floor s "
        "| sync / floor | s per 100 MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['mb']:.1f} | {r['stage']} | {r['sync']:.3f} | "
            f"{r['export']:.3f} | {r['sync'] - r['export']:.3f} | {r['floor']:.4f} | "
            f"{r['sync'] / r['floor']:.1f}x | {100 * r['sync'] / r['mb']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny-qwen2", "bench-qwen2-25m", "bench-qwen2-100m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument(
        "--zero3-models",
        nargs="*",
        default=[],
        help="also timed under ZeRO-3 (e.g. bench-qwen2-100m; ~1 min)",
    )
    args = ap.parse_args(argv)
    rows = run(args.models, args.repeats, args.world_size, args.zero3_models)
    print(table(rows, args.world_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
