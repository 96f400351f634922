"""The learner at real-model proportions (issue: completion-only logits, chunked log-softmax,
token-budget micro-batches), against TRL's GRPOTrainer: one learner step on a workload shaped like a
VLM RL batch, each variant in a fresh process.

Workload (the same draws for every variant): ``bench-qwen2-151k``, Qwen2's 151,936 vocabulary rows
(tied embeddings, as Qwen2-VL-2B) on a 4-layer, 256-wide body small enough for 2 cores; 16
sequences (2 prompts x G=8) with a 320-token prompt standing in for image and text tokens, and
completion lengths drawn from a skewed (log-normal) distribution clipped to [20, 512]; random
advantages; beta = 0; AdamW at lr 1e-6; one optimizer step over all 16 sequences.

Variants:

* ``ekipl before`` -- the learner before completion-only logits: the LM head and an fp32
  log-softmax at every position, prompt included, micro-batches of 4 rows in batch order;
* ``completion-only logits`` -- the LM head on completion positions only, ``logits_chunk_tokens``
  (256) rows at a time, each chunk's logits recomputed in the backward pass;
* ``token budget`` -- the same, rows packed by length under ``learner.max_tokens_per_micro_batch``
  (and with gradient checkpointing);
* ``padding-free packing`` -- ``learner.pack_sequences``: each micro-batch's rows as one row;
* ``TRL GRPOTrainer`` (from the ``bench`` dependency group) -- its own training loop, accumulation
  (4 micro-batches of 4 rows), loss (``dapo``) and optimizer on the same batch, which replaces its
  generation (``_generate_and_score_completions`` returns it). TRL 1.16 runs its LM head fused and
  tiled over the vocabulary; on a device without Triton (this CPU) it scores every position of the
  padded rows, prompt included, where with Triton it scores completion positions only. Both are
  measured: ``as on this CPU``, and ``completion positions only`` (its Triton-device path, the
  tiles folded in torch); the table gives ratios against each.

Reported: the learner step's time (median of repeats after a warm-up; generation is not in it: the
two trainers generate with different engines, and bench/perf/trl_compare.py times whole steps at a
forced length), the peak resident memory *during* the steps above what the process held before
them (Linux VmHWM, reset through ``/proc/self/clear_refs`` right before; it includes the optimizer's
state, created at the first step), and the padding (padded positions / real tokens, as each
trainer lays the rows out).

With CUDA the same comparison runs on the GPU at Qwen2-VL-2B's language-model proportions
(``bench-qwen2-vl-2b-lm``: its 28-layer, 1536-wide body and 151,936 tied rows, 1.54B parameters,
the LM head ~15% of the matmul FLOPs): ekipl in bf16 (DeepSpeed ZeRO-2, fp32 master weights) and
TRL at its defaults (fp32 weights, bf16 autocast, its Triton-fused LM head on completion positions),
all with gradient checkpointing (TRL's default), plus TRL with bf16 weights (its lightest memory
setting). Memory there is ``torch.cuda.max_memory_allocated`` over the whole process: weights,
optimizer state and the step's peak.

    .venv/bin/python -m bench.perf.learner [--repeats 3] [--model NAME] [--prompts 2] [--json FILE]
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
from pathlib import Path

import torch

from bench.perf.trainers import cuda_sync, grpo_config, step_clock

ROOT = Path(__file__).resolve().parents[2]
MODEL = "bench-qwen2-151k"
GPU_MODEL = "bench-qwen2-vl-2b-lm"
PROMPT_LEN = 320
LORA_RANK = 8  # learner.lora.rank in the LoRA rows (alpha 16, the default targets: attention + MLP)
BUDGET = 2560  # tokens (rows x longest row) per micro-batch: 4 micro-batches here, as 4 rows each
# A TRL row's "ref" names the ratio column it is the reference of; where two rows share one, a row
# is compared with the one of its own gradient checkpointing.
CPU_VARIANTS = {
    "ekipl before: full logits, 4-row micro-batches": dict(kind="ekipl", full=True, budget=0),
    "ekipl: completion-only logits, 4-row micro-batches": dict(kind="ekipl", full=False, budget=0),
    f"ekipl: completion-only logits, token budget {BUDGET:,}": dict(kind="ekipl", full=False, budget=BUDGET),
    "ekipl: the same + gradient checkpointing": dict(kind="ekipl", full=False, budget=BUDGET, ckpt=True),
    f"ekipl: padding-free packing, {BUDGET:,} tokens per micro-batch": dict(
        kind="ekipl", full=False, budget=BUDGET, pack=True
    ),
    "TRL GRPOTrainer, 4-row micro-batches, as on this CPU, gradient checkpointing (its default)": dict(
        kind="trl", ckpt=True, compact=False, ref="TRL CPU"
    ),
    "TRL GRPOTrainer, 4-row micro-batches, completion positions only (as with Triton)": dict(
        kind="trl", ckpt=False, compact=True, ref="TRL compl."
    ),
    "TRL GRPOTrainer, the same + gradient checkpointing": dict(
        kind="trl", ckpt=True, compact=True, ref="TRL compl."
    ),
    # LoRA as it runs at scale: with gradient checkpointing, against the rows above that have it
    f"ekipl: LoRA r={LORA_RANK} (peft), token budget {BUDGET:,} + gradient checkpointing": dict(
        kind="ekipl", full=False, budget=BUDGET, ckpt=True, lora=LORA_RANK
    ),
    f"TRL GRPOTrainer + peft LoRA r={LORA_RANK} (peft_config), completion positions only + gradient "
    "checkpointing": dict(kind="trl", ckpt=True, compact=True, lora=LORA_RANK, ref="TRL LoRA"),
}
# On a GPU: everything with gradient checkpointing (TRL's default); TRL's head is its Triton kernel.
GPU_VARIANTS = {  # in order of importance: a run cut short keeps the first
    f"ekipl: completion-only logits, token budget {BUDGET:,}": dict(
        kind="ekipl", full=False, budget=BUDGET, ckpt=True
    ),
    "TRL GRPOTrainer, its defaults: fp32 weights, bf16 autocast, 4-row micro-batches": dict(
        kind="trl", ckpt=True, compact=True, dtype="float32", ref="TRL"
    ),
    f"ekipl: LoRA r={LORA_RANK} (peft), token budget {BUDGET:,} + gradient checkpointing": dict(
        kind="ekipl", full=False, budget=BUDGET, ckpt=True, lora=LORA_RANK
    ),
    f"TRL GRPOTrainer + peft LoRA r={LORA_RANK}, its defaults otherwise": dict(
        kind="trl", ckpt=True, compact=True, dtype="float32", lora=LORA_RANK, ref="TRL LoRA"
    ),
    "ekipl before: full logits, 4-row micro-batches": dict(kind="ekipl", full=True, budget=0, ckpt=True),
    "TRL GRPOTrainer, bf16 weights (AdamW state in bf16 too)": dict(
        kind="trl", ckpt=True, compact=True, dtype="bfloat16", ref="TRL bf16"
    ),
    f"ekipl: padding-free packing, {BUDGET:,} tokens per micro-batch": dict(
        kind="ekipl", full=False, budget=BUDGET, ckpt=True, pack=True
    ),
    "ekipl: completion-only logits, 4-row micro-batches": dict(kind="ekipl", full=False, budget=0, ckpt=True),
}


def variants() -> dict[str, dict]:
    return GPU_VARIANTS if torch.cuda.is_available() else CPU_VARIANTS


def skewed_lengths(n: int, rng, cap: int = 512) -> list[int]:
    """Completion lengths like an RL batch's: log-normal around 90 tokens, clipped to [20, cap]
    (here and in bench/perf/gpu.py); a cap under 180 scales the median and the floor down with it, so
    that small test runs still draw different lengths."""
    median, floor = min(90.0, cap / 2), min(20, max(1, cap // 4))
    return [min(cap, max(floor, int(math.exp(rng.gauss(math.log(median), 0.9))))) for _ in range(n)]


def use_full_logits() -> None:
    """Make ekipl's learner compute log-probs as it did before completion-only logits: the LM head
    and an fp32 log-softmax at every position (the "before" rows here and in bench/perf/gpu.py)."""
    import ekipl.learner.worker as worker
    from ekipl.learner.logprobs import full_logprobs

    def full(model, mb, with_entropy=False, **_):
        return full_logprobs(model, mb, with_entropy)

    worker.sequence_logprobs = full


def make_batch(seed=0, prompts=2, group=8, prompt_len=PROMPT_LEN, vocab=1000):
    """A text-only batch with the proportions of a VLM RL step (see the module docstring)."""
    from ekipl.learner.batch import Batch

    rng = random.Random(seed)
    lengths = skewed_lengths(prompts * group, rng)
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


def _reset_peak() -> int:
    """The resident set now, in KiB, after resetting VmHWM (the peak resident set) to it."""
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before


def _peak_start() -> int:
    """Start measuring the peak (CPU: the resident set now, in KiB, VmHWM reset to it)."""
    return 0 if torch.cuda.is_available() else _reset_peak()


def _peak_mib(start: int) -> float:
    """CPU: the peak resident set above ``start``; CUDA: the process's peak allocated memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return (_rss_kib("VmHWM") - start) / 1024


def run_variant(name: str, a: argparse.Namespace) -> dict:
    """One variant in this process (called in a fresh one by :func:`main`)."""
    if variants()[name]["kind"] == "trl":
        return run_trl(name, a)
    return run_ekipl(name, a)


def run_trl(name: str, a: argparse.Namespace) -> dict:
    """TRL's GRPOTrainer on the same batch: its own training loop, accumulation, loss and optimizer
    (AdamW, torch), with generation replaced by the batch above (``_generate_and_score_completions``
    returns it, laid out as TRL lays out generated completions: prompts left-padded, completions
    right-padded to the longest one in the generation batch)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from ekipl.models.tiny import build_tiny

    v, cuda = variants()[name], torch.cuda.is_available()
    if v["compact"] and not cuda:  # TRL's fused head on completion positions only, as with Triton
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True  # the tiles still run in torch
    path = str(build_tiny(a.model))
    batch, lengths = make_batch(prompts=a.prompts)
    width = PROMPT_LEN + max(lengths)
    done = {
        "prompt_ids": batch.input_ids[:, :PROMPT_LEN],
        "prompt_mask": batch.attention_mask[:, :PROMPT_LEN],
        "completion_ids": batch.input_ids[:, PROMPT_LEN:width],
        "completion_mask": batch.attention_mask[:, PROMPT_LEN:width],
        "advantages": batch.advantages,
        "num_items_in_batch": batch.attention_mask[:, PROMPT_LEN:].sum(),
    }

    class Prepared(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            return {k: t.to(self.accelerator.device, copy=True) for k, t in done.items()}

    clock, step_times = step_clock()
    rows = len(lengths)
    args = grpo_config(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=rows // 4,  # one optimizer step per batch, as ekipl's
        num_generations=8,
        max_completion_length=512,
        learning_rate=1e-6,
        gradient_checkpointing=v["ckpt"],
        max_steps=a.repeats + 1,
        logging_steps=10**6,
        use_cpu=not cuda,
        bf16=cuda,
    )
    peft_config = None
    if v.get("lora"):
        from peft import LoraConfig

        from ekipl.learner.config import DEFAULT_TARGETS

        peft_config = LoraConfig(r=v["lora"], lora_alpha=16, target_modules=list(DEFAULT_TARGETS))
    trainer = Prepared(
        peft_config=peft_config,
        model=AutoModelForCausalLM.from_pretrained(path, dtype=v.get("dtype", "float32")),
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list(
            [{"prompt": f"p{i}"} for i in range(8 * a.prompts * (a.repeats + 1))]
        ),
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[clock],
    )
    before = _peak_start()
    trainer.train()
    times = step_times()[1:]
    return {
        "variant": name,
        "update_s": statistics.median(times),
        "peak_mib": _peak_mib(before),
        "padding_frac": rows * width / (sum(lengths) + rows * PROMPT_LEN) - 1,
        "micro_batches": rows // 4,
        "threads": torch.get_num_threads(),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "tokens": sum(lengths) + rows * PROMPT_LEN,
        "completion_tokens": sum(lengths),
    }


def run_ekipl(name: str, a: argparse.Namespace) -> dict:
    import ekipl.learner.worker as worker
    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.learner.config import LearnerConfig, LoraSettings
    from ekipl.models.tiny import build_tiny

    v = variants()[name]
    if v["full"]:
        use_full_logits()
    path = str(build_tiny(a.model))
    batch, _ = make_batch(prompts=a.prompts)
    cfg = LearnerConfig(
        world_size=1,
        zero_stage=2,
        lr=1e-6,
        micro_batch_size=4,
        max_tokens_per_micro_batch=v["budget"],
        gradient_checkpointing=v.get("ckpt", False),
        pack_sequences=v.get("pack", False),
        bf16=torch.cuda.is_available(),
        lora=LoraSettings(rank=v.get("lora", 0), alpha=16.0),
    )
    learner = worker.Learner(0, 1, path, cfg, ObjectiveConfig(), seed=0)
    learner.setup(*learner.rendezvous())
    plan = worker.plan_rows(batch.attention_mask.sum(-1).tolist(), cfg)
    before = _peak_start()
    times, metrics = [], {}
    for i in range(a.repeats + 1):
        t0 = time.perf_counter()
        metrics = learner.update(batch, plan, **batch.totals())
        cuda_sync()
        if i:
            times.append(time.perf_counter() - t0)
        if metrics["actor/skipped_step"]:
            raise RuntimeError("DeepSpeed skipped the optimizer step")
    return {
        "variant": name,
        "update_s": statistics.median(times),
        "peak_mib": _peak_mib(before),
        "padding_frac": metrics["actor/padding_frac"],
        "micro_batches": len(plan),
        "threads": torch.get_num_threads(),
        "trainable": learner.parameter_counts()["trainable"],
        "tokens": int(batch.attention_mask.sum()),
        "completion_tokens": int(batch.completion_mask.sum()),
    }


def head_share(model: str) -> float:
    """The LM head's share of a forward's matmul FLOPs per position, when it runs at every position."""
    from ekipl.models.tiny import spec_for

    t = spec_for(model)
    h, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    body = t.num_layers * (2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size)
    return t.vocab_rows * h / (t.vocab_rows * h + body)


def run_part(module: str, args: list[str], capture: bool = False) -> dict | None:
    """``python -m MODULE ARGS --out FILE`` in a fresh process (here and in bench/perf/gpu.py): the JSON
    result it wrote, printed as it comes (a run cut short keeps the parts done), or None where it
    failed, the failure printed. ``capture`` keeps the child's output back, a failure's stderr
    shown."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", module, *args, "--out", f.name]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=capture, text=True)
        if r.returncode:
            tail = f":\n{r.stderr[-3000:]}" if capture else ""
            print(
                f"{module}: {' '.join(args[:4])} failed (exit {r.returncode}){tail}",
                file=sys.stderr,
                flush=True,
            )
            return None
        out = json.loads(Path(f.name).read_text())
    print(f"{module}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def run_variants(module: str, names, shared: list[str]) -> tuple[list[dict], list[str]]:
    """``python -m MODULE --variant NAME SHARED`` for every name, each in a fresh process (here and
    in bench/perf/real_step.py): the rows, and the names of the variants that failed (reported, left out)."""
    parts = {name: run_part(module, ["--variant", name, *shared], capture=True) for name in names}
    return [r for r in parts.values() if r], [name for name, r in parts.items() if r is None]


def run_all(a: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Every variant of this bench."""
    shared = ["--repeats", str(a.repeats), "--model", a.model, "--prompts", str(a.prompts)]
    names = [n for n in variants() if not a.only or any(o in n for o in a.only)]
    return run_variants("bench.perf.learner", names, shared)


def _reference(row: dict, column: str, rows: list[dict]) -> dict | None:
    """The TRL row that is ``column``'s reference for ``row`` (the same checkpointing, if several)."""
    v = variants()
    refs = [r for r in rows if v[r["variant"]].get("ref") == column]
    same = [r for r in refs if v[r["variant"]]["ckpt"] == v[row["variant"]].get("ckpt", False)]
    return (same or refs or [None])[0]


def table(a: argparse.Namespace, rows: list[dict]) -> str:
    from ekipl.models.tiny import spec_for

    v, cuda = variants(), torch.cuda.is_available()
    model = a.model
    _, lengths = make_batch(prompts=a.prompts)
    columns = list(dict.fromkeys(c["ref"] for c in v.values() if "ref" in c))
    where = (
        f"{torch.cuda.get_device_name()}, ekipl in bf16 (DeepSpeed ZeRO-2), TRL with bf16 autocast"
        if cuda
        else f"fp32, {rows[0]['threads']} threads; ekipl on DeepSpeed ZeRO-2"
    )
    memory = "peak GPU MiB (max allocated)" if cuda else "peak extra RSS MiB"
    vs = " | ".join("vs " + c for c in columns)
    vocab = f"{spec_for(model).vocab_rows:,}" if spec_for(model).vocab_rows else "its tokenizer's"
    lines = [
        f"{model}: {vocab} vocabulary rows; LM head = {head_share(model):.0%} of a forward's matmul FLOPs "
        "per position when it runs everywhere (Qwen2-VL-2B: ~15%); "
        f"{len(lengths)} sequences, {PROMPT_LEN} prompt tokens, completions {min(lengths)}-{max(lengths)} "
        f"tokens (mean {statistics.mean(lengths):.0f}); one rank, {where}. Ratio columns: against the TRL "
        f"row named ({', '.join(columns)}).",
        "",
        f"| learner | micro-batches | trainable params | step s | vs before | {vs} | {memory} | vs before | "
        f"{vs} | padding |" + (" MFU |" if cuda else ""),
        "|---" * (8 + 2 * len(columns) + cuda) + "|",
    ]
    before = next((r for r in rows if v[r["variant"]].get("full")), None)
    for r in rows:
        refs = [before] + [_reference(r, c, rows) for c in columns]

        def ratios(key, r=r, refs=refs):
            return " | ".join(f"{r[key] / b[key]:.2f}x" if b else "-" for b in refs)

        mfu = f" {model_flops(model, r) / r['update_s'] / bf16_peak():.1%} |" if cuda else ""
        lines.append(
            f"| {r['variant']} | {r['micro_batches']} | {r.get('trainable', 0) / 1e6:.2f}M | "
            f"{r['update_s']:.2f} | {ratios('update_s')} | {r['peak_mib']:.0f} | {ratios('peak_mib')} | "
            f"{r['padding_frac']:.1%} |{mfu}"
        )
    return "\n".join(lines + lora_summary(rows))


def lora_summary(rows: list[dict]) -> list[str]:
    """LoRA against the full learner with the same micro-batching (the issue's bar: peak memory
    <= 0.35x, step time no worse)."""
    v = variants()

    def like(r, lora):  # ekipl's learner, token budget, no packing, with or without LoRA
        c = v[r["variant"]]
        return c["kind"] == "ekipl" and c["budget"] and not c.get("pack") and bool(c.get("lora")) == lora

    lora = next((r for r in rows if like(r, True)), None)
    ckpt = v[lora["variant"]].get("ckpt", False) if lora else None
    full = next((r for r in rows if like(r, False) and v[r["variant"]].get("ckpt", False) == ckpt), None)
    if not (lora and full):
        return []
    return [
        "",
        f"LoRA r={LORA_RANK} against the full learner (token budget {BUDGET:,}, the same micro-batches and "
        "checkpointing): "
        f"peak memory {lora['peak_mib'] / full['peak_mib']:.2f}x, "
        f"step time {lora['update_s'] / full['update_s']:.2f}x, "
        f"trainable parameters {lora['trainable'] / full['trainable']:.4f}x.",
    ]


BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, per the data sheets


def bf16_peak() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK.items() if k in name), float("nan"))


def model_flops(model: str, row: dict) -> float:
    """Matmul FLOPs of one step's forward and backward, 6 per parameter per token (model FLOPs, the
    MFU convention): the body at every position, the LM head at completion positions (what the
    learner computes); the same numerator for every row, so MFU compares as throughput (LoRA skips
    the frozen weights' gradients, about a third of them)."""
    from ekipl.models.tiny import spec_for

    t = spec_for(model)
    h, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    body = t.num_layers * (2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size)
    return 6.0 * (body * row["tokens"] + t.vocab_rows * h * row["completion_tokens"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=GPU_MODEL if torch.cuda.is_available() else MODEL)
    ap.add_argument("--prompts", type=int, default=2, help="prompts of G=8 sequences each (a GPU takes more)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument(
        "--only", nargs="+", default=None, help="run the variants whose names contain one of these"
    )
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # run one, in this process
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        Path(args.out).write_text(json.dumps(run_variant(args.variant, args)))
        return 0

    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench.perf.learner: TRL is missing; `make bench` installs the bench group", file=sys.stderr)
        return 2
    from ekipl.models.tiny import build_tiny

    build_tiny(args.model)  # once, before any timing
    rows, failed = run_all(args)
    if rows:
        print(table(args, rows), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": args.model, "rows": rows, "failed": failed}, indent=1)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
