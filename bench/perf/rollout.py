"""Policy rollout throughput through the Ray actor vs vLLM called directly in one process, and
with two engine replicas behind the router (scaling).

Both sides run the same engine spec on the same prompts (synthetic counting samples with images)
with a forced completion length, alternating repeats so that machine noise hits both alike.
Prints a Markdown table of medians and the ratio (goal: actor >= 0.9x direct). The 2-replica row
splits the same batch over two engine actors (on a 2-core machine they share the cores).

    .venv/bin/python -m bench.perf.rollout [--repeats 3] [--prompts 8] [--n 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)

    import ray

    from ekipl.engines import vllm_backend as vb
    from ekipl.models import hf
    from ekipl.models.tiny import build_tiny
    from ekipl.rollout.policy import PolicyRouter
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.prompts import build_messages
    from ekipl.tasks.synth import make_dataset

    path = str(build_tiny("tiny-qwen2-vl"))
    data = load_task_file(
        make_dataset("counting", tempfile.mkdtemp(), n_train=args.prompts, n_test=1)["train"]
    )
    proc = hf.load_processor(path)
    reqs = [
        vb.Request(
            prompt=proc.apply_chat_template(build_messages(s), add_generation_prompt=True, tokenize=False),
            images=s.load_images(),
        )
        for s in data
    ]
    spec = vb.EngineSpec(model=path, dtype="float32", seed=0)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        router = PolicyRouter(vb.EngineSpec(**vars(spec)), replicas=1)
        router2 = PolicyRouter(vb.EngineSpec(**vars(spec)), replicas=2)
        router.ready()
        router2.ready()
        llm = vb.start_engine(spec)
        params = vb.sampling_params(n=args.n, max_tokens=args.tokens, seed=0, ignore_eos=True)
        total = args.prompts * args.n * args.tokens

        def direct():
            out = vb.generate(llm, reqs, params)
            assert sum(len(c.token_ids) for g in out for c in g) == total

        def through(r):
            def fn():
                out = r.generate(
                    reqs, n=args.n, temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True
                )
                assert sum(len(c.token_ids) for g in out for c in g) == total

            return fn

        actor, two = through(router), through(router2)
        direct(), actor(), two()  # warm-up all
        times = {"direct": [], "actor": [], "2 replicas": []}
        for r in range(args.repeats):
            order = (("direct", direct), ("actor", actor), ("2 replicas", two))
            for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"### Policy rollout throughput: Ray actor vs direct vLLM (CPU, median of {args.repeats})\n")
    print(f"{args.prompts} prompts x {args.n} samples x {args.tokens} forced tokens = {total} tokens\n")
    print("| path | seconds | tokens/s | vs direct |\n|---|---|---|---|")
    for k in ("direct", "actor", "2 replicas"):
        print(f"| {k} | {med[k]:.3f} | {total / med[k]:.0f} | {med['direct'] / med[k]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
