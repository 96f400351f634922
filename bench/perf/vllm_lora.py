"""LoRA weights into the engine, two ways (issue: LoRA RL): merged weights through ekipl's weight
sync (the default: the engine needs no LoRA support) against the adapter alone through vLLM's own
LoRA serving (``enable_lora``, a ``LoRARequest`` per adapter version).

One LoRA learner rank (``learner.lora``, rank 8, its adapters set to random values and then changed
again: two "syncs") exports each version as ekipl does (``export_policy``: the merged
``model.safetensors`` and the adapter in peft's layout). Each way runs in its own process with one
vLLM engine on the base model:

* ``merged``: ``load_weights_from_file`` of the merged weights (the file-based form of the sync);
* ``adapter``: the next ``generate`` names the new adapter directory (vLLM loads it then).

Both then generate greedily for the same image prompts (synthetic counting). Reported: the time a
sync takes (merged: the load; adapter: its first generate minus a steady one), a steady generate's
time (median of 3), the bytes that travel, and the largest difference between the two ways'
log-probs of the same greedy tokens (the same tokens required).

    .venv/bin/python -m bench.perf.vllm_lora [--model tiny-qwen2-vl] [--prompts 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.perf.learner import run_part

RANK = 8


def export_versions(model: str, out: Path) -> list[Path]:
    """Two adapter versions of one LoRA learner, each exported as ekipl exports a policy."""
    import torch

    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.learner.config import LearnerConfig, LoraSettings
    from ekipl.learner.worker import Learner
    from ekipl.modelref import export_policy

    cfg = LearnerConfig(world_size=1, zero_stage=2, lora=LoraSettings(rank=RANK, alpha=16.0))
    learner = Learner(0, 1, model, cfg, ObjectiveConfig(), seed=0)
    learner.setup(*learner.rendezvous())
    gen = torch.Generator().manual_seed(0)
    versions = []
    for v in (1, 2):
        for name, p in learner.engine.module.named_parameters():
            if "lora_" in name:  # stands in for an update: every adapter matrix moves
                p.data.add_(torch.randn(p.shape, generator=gen) * 0.05)
        export_policy(learner, model, out / f"v{v}")
        versions.append(out / f"v{v}")
    learner.cleanup()
    return versions


def requests(model: str, n: int):
    from ekipl.engines import vllm_backend as vb
    from ekipl.models import hf
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.prompts import render_prompt
    from ekipl.tasks.synth import make_dataset

    data = load_task_file(make_dataset("counting", tempfile.mkdtemp(), n_train=n, n_test=1)["train"])
    proc = hf.load_processor(model)
    return [vb.Request(prompt=render_prompt(proc, s), images=s.load_images()) for s in data]


def run_way(a: argparse.Namespace) -> dict:
    """One way in this process: start the engine, sync each version, time, generate."""
    from ekipl.engines import vllm_backend as vb

    versions = [Path(v) for v in a.versions]
    adapter = a.way == "adapter"
    spec = vb.EngineSpec(
        model=a.model,
        dtype="float32",
        seed=0,
        enable_weight_sync=not adapter,
        max_lora_rank=RANK if adapter else 0,
    )
    t0 = time.perf_counter()
    llm = vb.start_engine(spec)
    start_s = time.perf_counter() - t0
    reqs = requests(a.model, a.prompts)
    params = vb.sampling_params(
        n=1, temperature=0.0, max_tokens=a.tokens, banned_token_ids=vb.placeholder_token_ids(llm)
    )
    out = {"way": a.way, "start_s": start_s, "versions": []}
    for v in versions:
        which = str(v / "adapter") if adapter else None
        t0 = time.perf_counter()
        if not adapter:
            vb.load_weights_from_file(llm, str(v / "model.safetensors"))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = vb.generate(llm, reqs, params, adapter=which)
        first_s = time.perf_counter() - t0
        steady = []
        for _ in range(3):
            t0 = time.perf_counter()
            vb.generate(llm, reqs, params, adapter=which)
            steady.append(time.perf_counter() - t0)
        gen_s = statistics.median(steady)
        out["versions"].append(
            {
                "sync_s": load_s if not adapter else max(0.0, first_s - gen_s),
                "generate_s": gen_s,
                "bytes": sum(f.stat().st_size for f in (v / "adapter").iterdir())
                if adapter
                else (v / "model.safetensors").stat().st_size,
                "tokens": [c.token_ids for (c,) in first],
                "logprobs": [c.logprobs for (c,) in first],
            }
        )
    return out


def compare(merged: dict, adapter: dict) -> list[dict]:
    rows = []
    for i, (m, a) in enumerate(zip(merged["versions"], adapter["versions"], strict=True)):
        same = m["tokens"] == a["tokens"]
        diff = max(
            (
                abs(x - y)
                for lm, la in zip(m["logprobs"], a["logprobs"], strict=True)
                for x, y in zip(lm, la, strict=True)
            ),
            default=0.0,
        )
        rows.append(
            {"version": i + 1, "same_tokens": same, "max_logprob_diff": diff if same else float("nan")}
        )
    return rows


def table(merged: dict, adapter: dict, rows: list[dict]) -> str:
    lines = [
        "| way | engine start s | sync s (v1 / v2) | steady generate s (v1 / v2) | bytes per sync |",
        "|---|---|---|---|---|",
    ]
    for w in (merged, adapter):
        vs = w["versions"]
        lines.append(
            f"| {w['way']} | {w['start_s']:.1f} | {vs[0]['sync_s']:.3f} / {vs[1]['sync_s']:.3f} | "
            f"{vs[0]['generate_s']:.3f} / {vs[1]['generate_s']:.3f} | {vs[0]['bytes'] / 1e6:.2f} MB |"
        )
    gen = statistics.mean(v["generate_s"] for v in adapter["versions"]) / statistics.mean(
        v["generate_s"] for v in merged["versions"]
    )
    lines += [
        "",
        f"Adapter serving's steady generate: {gen:.2f}x the merged engine's. Same greedy tokens and the "
        "largest log-prob difference, per version: "
        + "; ".join(f"v{r['version']}: {r['same_tokens']}, {r['max_logprob_diff']:.2e}" for r in rows),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-qwen2-vl")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--way", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--versions", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.way:
        Path(a.out).write_text(json.dumps(run_way(a)))
        return 0
    from ekipl.modelref import resolve_model

    model = resolve_model(a.model)
    versions = export_versions(model, Path(tempfile.mkdtemp(prefix="ekipl-bench-vllm-lora-")))
    shared = [
        "--model",
        model,
        "--prompts",
        str(a.prompts),
        "--tokens",
        str(a.tokens),
        "--versions",
        *map(str, versions),
    ]
    ways = {
        w: run_part("bench.perf.vllm_lora", ["--way", w, *shared], capture=True)
        for w in ("merged", "adapter")
    }
    if None in ways.values():
        return 1
    rows = compare(ways["merged"], ways["adapter"])
    print(table(ways["merged"], ways["adapter"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "ways": ways, "compare": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
