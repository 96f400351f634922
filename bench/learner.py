"""The learner at real-model proportions (issue: completion-only logits, chunked log-softmax,
token-budget micro-batches): one DeepSpeed learner rank's update on a workload shaped like a VLM RL
batch, for today's learner and the new one, each variant in a fresh process.

Workload (the same draws for every variant): ``bench-qwen2-151k``, Qwen2's 151,936 vocabulary rows
(tied embeddings, as Qwen2-VL-2B) on a 4-layer, 256-wide body small enough for 2 cores; 16
sequences (2 prompts x G=8) with a 320-token prompt standing in for image and text tokens, and
completion lengths drawn from a skewed (log-normal) distribution clipped to [20, 512].

Variants:

* ``full logits, 4-row micro-batches`` -- the learner before this change: the LM head and an fp32
  log-softmax at every position, prompt included, micro-batches of 4 rows in batch order;
* ``completion-only, 4-row micro-batches`` -- the LM head on completion positions only, 1,024 rows
  at a time, each chunk's logits recomputed in the backward pass;
* ``completion-only, token budget`` -- the same, with rows packed by length under
  ``learner.max_tokens_per_micro_batch``.

Reported: the update's time (median of repeats after a warm-up), the peak resident memory *during*
the updates above what the process held before them (Linux VmHWM, reset through
``/proc/self/clear_refs`` right before; it includes the optimizer's state, created at the first
update), and the padding (padded positions / real tokens).

    .venv/bin/python -m bench.learner [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

MODEL = "bench-qwen2-151k"
VARIANTS = {
    "full logits, 4-row micro-batches": dict(full=True, budget=0),
    "completion-only, 4-row micro-batches": dict(full=False, budget=0),
    "completion-only, token budget 3,328": dict(full=False, budget=3328),
}


def make_batch(seed: int = 0, prompts: int = 2, group: int = 8, prompt_len: int = 320, vocab: int = 1000):
    """A text-only batch with the proportions of a VLM RL step (see the module docstring)."""
    from ekipl.learner.batch import Batch

    rng = random.Random(seed)
    lengths = [min(512, max(20, int(math.exp(rng.gauss(math.log(90), 0.9))))) for _ in range(prompts * group)]
    total = prompt_len + max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros(len(lengths), total - 1)
    prompt: list[int] = []
    for i, n in enumerate(lengths):
        if i % group == 0:  # a group shares its prompt
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        ids[i, : prompt_len + n] = torch.tensor(prompt + [rng.randrange(vocab) for _ in range(n)])
        attn[i, : prompt_len + n] = 1
        cmask[i, prompt_len - 1 : prompt_len + n - 1] = 1.0
    adv = torch.tensor([rng.gauss(0, 1) for _ in lengths])
    is_aux = torch.tensor([i % group >= group - 2 for i in range(len(lengths))])
    batch = Batch(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=cmask,
        advantages=adv,
        is_aux=is_aux,
        source_ids=is_aux.long(),
        sources=["policy", "aux"],
    )
    return batch, lengths


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_variant(name: str, repeats: int) -> dict:
    """One variant in this process (called in a fresh one by :func:`main`)."""
    import ekipl.learner.worker as worker
    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.learner.config import LearnerConfig
    from ekipl.learner.logprobs import full_logprobs
    from ekipl.models.tiny import build_tiny

    v = VARIANTS[name]
    if v["full"]:  # today's learner: logits and log-softmax at every position
        worker.sequence_logprobs = lambda model, mb, with_entropy=False, chunk_tokens=0: full_logprobs(
            model, mb, with_entropy
        )
    path = str(build_tiny(MODEL))
    batch, _ = make_batch()
    cfg = LearnerConfig(
        world_size=1, zero_stage=2, lr=1e-6, micro_batch_size=4, max_tokens_per_micro_batch=v["budget"]
    )
    learner = worker.Learner(0, 1, path, cfg, ObjectiveConfig(), seed=0)
    learner.setup(*learner.rendezvous())
    plan = worker.plan_rows(batch.attention_mask.sum(-1).tolist(), cfg)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    times, metrics = [], {}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        metrics = learner.update(batch, plan, **batch.totals())
        if i:
            times.append(time.perf_counter() - t0)
        if metrics["actor/skipped_step"]:
            raise RuntimeError("DeepSpeed skipped the optimizer step")
    return {
        "variant": name,
        "update_s": statistics.median(times),
        "peak_extra_mib": (_rss_kib("VmHWM") - before) / 1024,
        "padding_frac": metrics["actor/padding_frac"],
        "micro_batches": len(plan),
        "threads": torch.get_num_threads(),
    }


def head_share(hidden=256, inter=704, layers=4, kv_heads=2, heads=8, vocab=151936) -> float:
    """The LM head's share of a forward's matmul FLOPs per position, when it runs at every position."""
    hd = hidden // heads
    body = layers * (2 * hidden * hidden + 2 * hidden * kv_heads * hd + 3 * hidden * inter)
    return vocab * hidden / (vocab * hidden + body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # run one, in this process
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        result = run_variant(args.variant, args.repeats)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0

    from ekipl.models.tiny import build_tiny

    build_tiny(MODEL)  # once, before any timing
    _, lengths = make_batch()
    rows = []
    for name in VARIANTS:
        out = tempfile.mktemp(suffix=".json")
        cmd = [
            sys.executable,
            "-m",
            "bench.learner",
            "--variant",
            name,
            "--json",
            out,
            "--repeats",
            str(args.repeats),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{name}: {r.stderr[-3000:]}")
        rows.append(json.load(open(out)))
    base = rows[0]
    print(
        f"{MODEL}: 151,936 vocabulary rows; LM head = {head_share():.0%} of a forward's matmul FLOPs per "
        "position when it runs everywhere (Qwen2-VL-2B: ~15%, so carry the time ratios over with care); "
        f"16 sequences, 320 prompt tokens, completions {min(lengths)}-{max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}); one rank, ZeRO-2, fp32, {rows[0]['threads']} threads.\n"
    )
    print("| learner | micro-batches | update s | vs today | peak extra RSS MiB | vs today | padding |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['micro_batches']} | {r['update_s']:.2f} | "
            f"{r['update_s'] / base['update_s']:.2f}x | {r['peak_extra_mib']:.0f} | "
            f"{r['peak_extra_mib'] / base['peak_extra_mib']:.2f}x | {r['padding_frac']:.1%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
