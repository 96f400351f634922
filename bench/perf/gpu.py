"""The GPU section: what runs where there is torch, transformers and DeepSpeed but no vLLM and no
Ray (the lent GPU machines' image), measured through ekipl's own code.

    python -m bench.perf.gpu [--model bench-qwen2-vl-2b] [--stages 2 3] [--repeats 3] [--variants ...]

With CUDA the default policy is Qwen2-VL-2B's shapes with random weights (``bench-qwen2-vl-2b``,
built locally, bf16); without, the tiny VLM in fp32, so that the same code runs on a CPU machine
(``tests/test_bench_gpu.py``). ``--model`` also takes a local model directory. Tables:

1. **Learner step**: one rank of :class:`ekipl.learner.worker.Learner`, the class the Ray actors
   wrap (DeepSpeed ZeRO on NCCL with CUDA, gloo without), per ZeRO stage, each in its own process:
   reference log-probs (β > 0), then the update (π_old from the first epoch, the objective,
   backward, optimizer step) on a batch of ``--prompts`` x ``--group`` actions of ``--tokens``
   forced completion tokens with one image each (a quarter of each group from an auxiliary source,
   so the off-policy path runs). Tokens/s counts every token the forward passes see.
2. **Weight export**: ``Learner.export_weights`` into the shared-memory sync buffer (what a sync
   costs on the learner's side) against the floor: copying the same tensors once to host memory
   already allocated (bench.perf.weight_sync's floor).
3. **Objective**: ``ekipl.algo.objective.policy_loss`` on the device against float64 on the CPU,
   for every off-policy mode and aggregation: the largest difference in loss and gradient, and
   the time of one forward+backward.
4. **HF generation**: transformers ``generate`` on the device (the ``hf`` auxiliary source's
   library) for the batch's prompts, ``--tokens`` forced new tokens, sampled.
5. **Learner at real proportions** (``--variants``; all four with CUDA, none by default without):
   bench/perf/learner.py's variants on this model and device, each in its own process: the update
   (β 0) on the batch's prompts with completion lengths drawn skewed (log-normal, 20 to
   ``--longest``, 512 with CUDA) for the learner before completion-only logits, completion-only
   logits, a token budget, and padding-free packing: seconds, peak memory, padding.

DeepSpeed runs on one rank: NCCL refuses two ranks on one GPU, and the lent machines have one.

On a machine with torch and transformers but no DeepSpeed: ``make gpu-carry`` here lays out
``.gpu/`` (DeepSpeed as installed here, pydantic's wheels for Python 3.12, ~14 MB); carry it with
the code, and there run::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD python3 -m bench.perf.gpu --json gpu.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.perf.learner import run_part
from bench.perf.trainers import cuda_sync as _sync


def resolve_model(name: str) -> str:
    """A tiny/bench model name (built locally, cached) or a local model directory."""
    from ekipl.models.tiny import TINY_MODELS, build_tiny

    if name in TINY_MODELS:
        return str(build_tiny(name))
    if not Path(name).is_dir():
        raise SystemExit(f"--model {name!r}: neither a tiny model name nor a local directory")
    return name


def make_batch(model_path: str, prompts: int, group: int, tokens: int, seed: int = 0, skewed: bool = False):
    """A collated batch like a rollout's: synthetic counting prompts with their images, ``group``
    actions each of ``tokens`` random ordinary tokens (``skewed``: of bench.perf.learner's
    ``skewed_lengths``, at most ``tokens``; the last quarter from an auxiliary source), random
    0/1/2 rewards and GRPO advantages."""
    import random

    from ekipl.algo import objective as O
    from ekipl.learner.batch import collate
    from ekipl.models import hf
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.prompts import build_messages
    from ekipl.tasks.synth import make_dataset
    from ekipl.types import Action, Group

    processor = hf.load_processor(model_path)
    tok = processor.tokenizer
    data_dir = tempfile.mkdtemp(prefix="ekipl-bench-gpu-")
    atexit.register(shutil.rmtree, data_dir, True)
    paths = make_dataset("counting", data_dir, n_train=prompts, n_test=1, seed=seed)
    samples = [s for _, s in zip(range(prompts), load_task_file(paths["train"]), strict=False)]
    rng = random.Random(seed)
    ordinary = range(tok.convert_tokens_to_ids("<|endoftext|>"))  # BPE tokens, no special ones
    n_aux = group // 4
    from bench.perf.learner import skewed_lengths

    lengths = skewed_lengths(prompts * group, random.Random(seed + 1), tokens) if skewed else None
    groups = []
    for s in samples:
        prompt = processor.apply_chat_template(build_messages(s), add_generation_prompt=True, tokenize=False)
        actions = [
            Action(
                source="policy" if j < group - n_aux else "aux",
                token_ids=[rng.choice(ordinary) for _ in range(lengths.pop() if lengths else tokens)],
                text="",
                reward=float(rng.randint(0, 2)),
            )
            for j in range(group)
        ]
        groups.append(Group(sample=s, prompt=prompt, actions=actions))
    rewards = torch.tensor([a.reward for g in groups for a in g.actions])
    index = torch.tensor([i for i, g in enumerate(groups) for _ in g.actions])
    is_policy = torch.tensor([a.is_policy for g in groups for a in g.actions])
    advantages = O.group_advantages(rewards, index, is_policy, "grpo")
    return collate(groups, processor, advantages), processor, samples


# --------------------------------------------------------------------------------------------------
# 1 and 2: one learner rank, in its own process per ZeRO stage


def learner_part(a: argparse.Namespace) -> dict:
    from bench.perf.weight_sync import copy_floor
    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.learner.config import LearnerConfig
    from ekipl.learner.worker import Learner

    cuda = torch.cuda.is_available()
    batch, _, _ = make_batch(a.model, a.prompts, a.group, a.tokens)
    cfg = LearnerConfig(
        world_size=1,
        zero_stage=a.stage,
        lr=1e-6,
        micro_batch_size=a.micro_batch,
        gradient_checkpointing=cuda and not a.no_checkpointing,
        bf16=cuda,
    )
    learner = Learner(0, 1, a.model, cfg, ObjectiveConfig(kl_coef=a.beta), seed=0)
    t0 = time.perf_counter()
    learner.setup(*learner.rendezvous())
    setup_s = time.perf_counter() - t0
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in learner.engine.module.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ref_s, update_s, step_s = [], [], []
    for i in range(a.repeats + 1):  # the first is a warm-up
        _sync()
        t0 = time.perf_counter()
        if a.beta > 0:
            ref = learner.logprobs(batch, reference=True)
            batch.ref_logp = ref[:, : batch.input_ids.shape[1] - 1]
        _sync()
        t1 = time.perf_counter()
        metrics = learner.update(batch, **batch.totals())
        _sync()
        t2 = time.perf_counter()
        if metrics["actor/skipped_step"]:
            raise RuntimeError(f"step {i}: DeepSpeed skipped the optimizer step (non-finite gradients)")
        if i:
            ref_s.append(t1 - t0)
            update_s.append(t2 - t1)
            step_s.append(t2 - t0)
    out = {
        "stage": a.stage,
        "params": n_params,
        "dtype": "bf16" if cfg.bf16 else "fp32",
        "checkpointing": cfg.gradient_checkpointing,
        "rows": len(batch),
        "seq_len": int(batch.input_ids.shape[1]),
        "tokens": int(batch.attention_mask.sum()),
        "completion_tokens": int(batch.completion_mask.sum()),
        "setup_s": setup_s,
        "ref_s": statistics.median(ref_s),
        "update_s": statistics.median(update_s),
        "step_s": statistics.median(step_s),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": metrics["actor/pg_loss"],
    }
    export_s = []
    for _ in range(a.repeats + 1):  # the first lays the buffer out
        _sync()
        t0 = time.perf_counter()
        _, nbytes = learner.export_weights()
        export_s.append(time.perf_counter() - t0)
    out.update(export_s=statistics.median(export_s[1:]), export_bytes=nbytes)
    if a.stage < 3:  # the full weights are on this rank: the floor copies them to the host
        state = {n: p.detach() for n, p in learner.engine.module.named_parameters()}
        out["floor_s"] = copy_floor(state, a.repeats, device="cpu")
    learner.cleanup()
    return out


def run_learner_parts(a: argparse.Namespace) -> list[dict]:
    """Each ZeRO stage in a fresh process; a single stage runs in this process."""
    if len(a.stages) == 1:
        return [learner_part(argparse.Namespace(**{**vars(a), "stage": a.stages[0]}))]
    parts = [
        run_part("bench.perf.gpu", ["--part", "learner", "--stage", str(stage), *_shared_args(a)])
        for stage in a.stages
    ]
    return [r for r in parts if r]


# The learner at real proportions (bench/perf/learner.py's variants, on this device): completion lengths
# of bench.perf.learner's skewed_lengths, at most --longest; the token budget is --micro-batch x the mean
# row length, so about as many micro-batches as --micro-batch rows each.
LEARNER_VARIANTS = {
    "before": "full logits, --micro-batch rows",
    "completion": "completion-only logits, --micro-batch rows",
    "budget": "completion-only logits, token budget",
    "pack": "padding-free packing, token budget",
}


def variant_part(a: argparse.Namespace) -> dict:
    """One learner variant's update (beta = 0) on one rank, at ZeRO stage ``a.stage``."""
    import ekipl.learner.worker as worker
    from bench.perf.learner import use_full_logits
    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.learner.config import LearnerConfig

    cuda = torch.cuda.is_available()
    if a.variant == "before":
        use_full_logits()
    batch, _, _ = make_batch(a.model, a.prompts, a.group, a.longest, skewed=True)
    rows = batch.attention_mask.sum(-1)
    budget = a.micro_batch * int(rows.float().mean()) if a.variant in ("budget", "pack") else 0
    cfg = LearnerConfig(
        world_size=1,
        zero_stage=a.stage,
        lr=1e-6,
        micro_batch_size=a.micro_batch,
        max_tokens_per_micro_batch=budget,
        pack_sequences=a.variant == "pack",
        gradient_checkpointing=cuda and not a.no_checkpointing,
        bf16=cuda,
    )
    learner = worker.Learner(0, 1, a.model, cfg, ObjectiveConfig(kl_coef=0.0), seed=0)
    learner.setup(*learner.rendezvous())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, metrics = [], {}
    for i in range(a.repeats + 1):  # the first is a warm-up
        _sync()
        t0 = time.perf_counter()
        metrics = learner.update(batch, **batch.totals())
        _sync()
        if i:
            times.append(time.perf_counter() - t0)
    learner.cleanup()
    return {
        "variant": a.variant,
        "stage": a.stage,
        "budget": budget,
        "rows": len(batch),
        "completion_tokens": int(batch.completion_mask.sum()),
        "completions": [int(batch.completion_mask.sum(-1).min()), int(batch.completion_mask.sum(-1).max())],
        "micro_batches": int(metrics["actor/micro_batches"]),
        "update_s": statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "padding_frac": metrics["actor/padding_frac"],
        "loss": metrics["actor/pg_loss"],
    }


def run_variant_parts(a: argparse.Namespace) -> list[dict]:
    """Each of ``a.variants`` in a fresh process, at the first of ``a.stages``."""
    stage = ["--stage", str(a.stages[0])]
    parts = [
        run_part("bench.perf.gpu", ["--part", "variant", "--variant", name, *stage, *_shared_args(a)])
        for name in a.variants
    ]
    return [r for r in parts if r]


def _shared_args(a: argparse.Namespace) -> list[str]:
    args = ["--model", a.model, "--prompts", str(a.prompts), "--group", str(a.group)]
    args += ["--tokens", str(a.tokens), "--micro-batch", str(a.micro_batch), "--beta", str(a.beta)]
    args += ["--repeats", str(a.repeats), "--longest", str(a.longest)]
    args += ["--no-checkpointing"] if a.no_checkpointing else []
    return args


# --------------------------------------------------------------------------------------------------
# 3: the objective


def objective_rows(device: str, rows: int, tokens: int, repeats: int) -> list[dict]:
    """policy_loss on ``device`` (fp32) against float64 on the CPU, for every mode, same inputs."""
    from ekipl.algo import objective as O

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 4
    old = logp + 0.2 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    mask = (torch.rand(rows, tokens, generator=g) > 0.1).double()
    is_aux = torch.arange(rows) % 4 == 3
    inputs = {
        dev_dtype: [t.to(*dev_dtype) for t in (logp, old, ref, adv, mask)] + [is_aux.to(dev_dtype[0])]
        for dev_dtype in (("cpu", torch.float64), (device, torch.float32))
    }
    out = []
    for mode in sorted(O.OFFPOLICY):
        for agg in O.AGGREGATIONS:
            cfg = O.ObjectiveConfig(offpolicy=mode, aggregation=agg, kl_coef=0.04)

            def run(dev_dtype, cfg=cfg):
                """One forward and backward on inputs already on the device (only this is timed)."""
                lp, o, r, a, m, aux = inputs[dev_dtype]
                x = lp.detach().clone().requires_grad_(True)
                loss, _ = O.policy_loss(cfg, x, o, a, m, aux, r)
                loss.backward()
                return loss.detach(), x.grad

            want_loss, want_grad = run(("cpu", torch.float64))
            times = []
            for _ in range(repeats + 1):
                _sync()
                t0 = time.perf_counter()
                got_loss, got_grad = run((device, torch.float32))
                _sync()
                times.append(time.perf_counter() - t0)
            got_loss, got_grad = got_loss.double().cpu(), got_grad.double().cpu()
            out.append(
                {
                    "offpolicy": mode,
                    "aggregation": agg,
                    "loss_diff": float((got_loss - want_loss).abs()),
                    "grad_diff": float((got_grad - want_grad).abs().max()),
                    "grad_scale": float(want_grad.abs().max()),
                    "ms": 1e3 * statistics.median(times[1:]),
                }
            )
    return out


# --------------------------------------------------------------------------------------------------
# 4: HF generation


def generation_part(a: argparse.Namespace) -> dict:
    from ekipl.models import hf
    from ekipl.tasks.prompts import build_messages

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    _, processor, samples = make_batch(a.model, a.prompts, 1, 1)
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(build_messages(s), add_generation_prompt=True, tokenize=False)
        for s in samples
        for _ in range(a.group)
    ]
    images = [img for s in samples for img in s.load_images() for _ in range(a.group)]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True).to(device)
    model = hf.load_model(a.model, dtype=torch.bfloat16 if cuda else torch.float32).to(device).eval()
    times = []
    for _ in range(a.repeats + 1):
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=True, max_new_tokens=a.tokens, min_new_tokens=a.tokens, temperature=1.0
            )
        _sync()
        times.append(time.perf_counter() - t0)
    new = int(out.shape[1] - enc["input_ids"].shape[1]) * int(out.shape[0])
    s = statistics.median(times[1:])
    dtype = "bf16" if cuda else "fp32"
    return {"rows": int(out.shape[0]), "new_tokens": new, "s": s, "tok_s": new / s, "dtype": dtype}


# --------------------------------------------------------------------------------------------------
# Tables


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def tables(env: dict, learner: list[dict], objective: list[dict], gen: dict) -> str:
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"deepspeed {env['deepspeed']}. Median of {env['repeats']} after a warm-up.",
        "",
        "| model | params | dtype | ZeRO | grad ckpt | rows x seq | tokens | ref log-prob s | update s "
        "| step s | tokens/s | model TFLOP/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in learner:
        # 6·N per token for the update's forward + backward, 2·N for the reference pass.
        flops = r["params"] * r["tokens"] * (6 + (2 if env["beta"] > 0 else 0))
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {env['model']} | {_count(r['params'])} | {r['dtype']} | {r['stage']} | "
            f"{'on' if r['checkpointing'] else 'off'} | {r['rows']} x {r['seq_len']} | {r['tokens']} | "
            f"{r['ref_s']:.3f} | {r['update_s']:.3f} | {r['step_s']:.3f} | {r['tokens'] / r['step_s']:.0f} | "
            f"{flops / r['step_s'] / 1e12:.2f} | {peak} |"
        )
    floor = next((r["floor_s"] for r in learner if "floor_s" in r), None)
    lines += [
        "",
        "| ZeRO | MB | export to sync buffer s | device->host copy floor s | export / floor |",
        "|---|---|---|---|---|",
    ]
    for r in learner:
        ratio = f"{r['export_s'] / floor:.1f}x" if floor else "-"
        floor_cell = f"{floor:.4f}" if floor else "-"
        lines.append(
            f"| {r['stage']} | {r['export_bytes'] / 1e6:.0f} | {r['export_s']:.4f} | {floor_cell} | {ratio} |"
        )
    lines += [
        "",
        f"Objective on {env['device_kind']} (fp32) vs float64 on the CPU, {env['rows']} x "
        f"{env['tokens']} tokens, β 0.04:",
        "",
        "| off-policy | aggregation | max abs loss diff | max abs grad diff (of max grad) | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for r in objective:
        lines.append(
            f"| {r['offpolicy']} | {r['aggregation']} | {r['loss_diff']:.1e} | "
            f"{r['grad_diff']:.1e} ({r['grad_scale']:.1e}) | {r['ms']:.2f} |"
        )
    lines += [
        "",
        "| HF generate | rows | new tokens | s | tokens/s |",
        "|---|---|---|---|---|",
        f"| {env['model']} {gen['dtype']} | {gen['rows']} | {gen['new_tokens']} | {gen['s']:.2f} | "
        f"{gen['tok_s']:.0f} |",
    ]
    return "\n".join(lines)


def variant_table(env: dict, variants: list[dict]) -> str:
    if not variants:
        return ""
    r0 = variants[0]
    lines = [
        "",
        "",
        f"Learner at real proportions: {r0['rows']} rows, completions {r0['completions'][0]}-"
        f"{r0['completions'][1]} tokens long (skewed), one rank, ZeRO-{r0['stage']}, update only (β 0):",
        "",
        "| learner | budget | micro-batches | update s | vs before | peak GiB | padding |",
        "|---|---|---|---|---|---|---|",
    ]
    before = next((r for r in variants if r["variant"] == "before"), None)
    for r in variants:
        vs = f"{r['update_s'] / before['update_s']:.2f}x" if before else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {LEARNER_VARIANTS[r['variant']]} | {r['budget'] or '-'} | {r['micro_batches']} | "
            f"{r['update_s']:.3f} | {vs} | {peak} | {r['padding_frac']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bench-qwen2-vl-2b" if cuda else "tiny-qwen2-vl")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8, help="actions per prompt (G)")
    p.add_argument("--tokens", type=int, default=256 if cuda else 16, help="forced completion tokens")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: reference pass)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-checkpointing", action="store_true", help="no gradient checkpointing on CUDA")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument(
        "--variants",
        nargs="*",
        choices=list(LEARNER_VARIANTS),
        default=list(LEARNER_VARIANTS) if cuda else [],
        help="learner variants at real proportions (skewed completion lengths, at most --longest)",
    )
    p.add_argument("--longest", type=int, default=512 if cuda else 16, help="variants: longest completion")
    p.add_argument("--part", choices=["learner", "variant"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(LEARNER_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.part:  # a child process: one part, its result as JSON in --out
        Path(a.out).write_text(json.dumps(learner_part(a) if a.part == "learner" else variant_part(a)))
        return 0

    name = a.model
    a.model = resolve_model(a.model)
    from importlib.metadata import version

    env = {
        "model": Path(name).name,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "device_kind": "CUDA" if cuda else "CPU",
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "deepspeed": version("deepspeed"),
        "repeats": a.repeats,
        "beta": a.beta,
        "tokens": a.tokens,
        "rows": a.prompts * a.group,
    }
    learner = run_learner_parts(a)
    variants = run_variant_parts(a)
    objective = objective_rows("cuda" if cuda else "cpu", a.prompts * a.group, a.tokens, a.repeats)
    gen = generation_part(a)
    print(tables(env, learner, objective, gen) + variant_table(env, variants), flush=True)
    if a.json:
        results = {"env": env, "learner": learner, "variants": variants, "objective": objective}
        results["generate"] = gen
        Path(a.json).write_text(json.dumps(results, indent=1))
    complete = len(learner) == len(a.stages) and len(variants) == len(a.variants)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
