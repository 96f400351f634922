"""The whole step on the realistic workload, generation included: ekipl against TRL's GRPOTrainer,
side by side in one run (bench/perf/learner.py times the learner alone on the same workload).

    .venv/bin/python -m bench.perf.real_step [--repeats 3] [--json FILE]

Workload, the same for every variant and every step: ``bench-qwen2-151k`` (Qwen2's 151,936
vocabulary rows on a 4-layer, 256-wide body), 2 prompts x G=8 per step, each prompt exactly
``PROMPT_LEN`` tokens after the chat template (words of one token each standing in for image
tokens), and completion lengths drawn as bench/perf/learner.py draws them (``skewed_lengths``: 25-395
tokens, mean 103), row by row the same in both trainers. Each completion is made exactly its drawn
length: in ekipl by a per-request ``max_tokens`` with EOS ignored (a group's G samples sent as G
requests of one sample, which is how vLLM runs ``n`` samples anyway); in TRL by a logits processor
in transformers' ``generate`` that holds EOS back until the row's length and then forces it. The
bench checks every row's length. Random weights mostly sample vocabulary rows the small tokenizer
cannot decode, so the texts are empty and every reward is 0; both trainers still run every forward,
backward and optimizer step (advantages 0, β 0, AdamW lr 1e-6, one optimizer step per batch).

Variants, each in a fresh process:

* ekipl: the trainer's own step (``ekipl.train.StepParts.run``): the policy's vLLM engine in a Ray actor, one
  DeepSpeed ZeRO-2 learner rank in a Ray actor with the token budget (2,560), weight sync; fp32.
* TRL 1.16 GRPOTrainer in this process: transformers ``generate`` (its vLLM modes need CUDA), then its
  loop over 4 micro-batches of 4 rows; as it runs on this CPU (its LM head at every position,
  gradient checkpointing, its defaults), and on completion positions only (its Triton-device path
  forced, as bench/perf/learner.py does; without checkpointing, its faster setting here).

Reported (median of ``--repeats`` steps after a warm-up): the step's wall time, its generation and
its learner share (ekipl: log-probs + update, then the weight sync; TRL: the step less ``generate``),
and the generated positions per real token (HF ``generate`` runs every row to the batch's longest).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.perf.learner import BUDGET, MODEL, PROMPT_LEN, run_variants, skewed_lengths

G, PROMPTS = 8, 2
VARIANTS = {
    f"ekipl: the trainer's step, token budget {BUDGET:,}": dict(kind="ekipl"),
    "TRL GRPOTrainer, as on this CPU (its defaults, gradient checkpointing)": dict(kind="trl", compact=False),
    "TRL GRPOTrainer, completion positions only (as with Triton)": dict(kind="trl", compact=True),
}


def draws() -> list[int]:
    """Each row's completion length (row g*G + j: group g's j-th sample), bench/perf/learner.py's draws."""
    return skewed_lengths(PROMPTS * G, random.Random(0))


def samples(path: str, n: int) -> list:
    """``n`` text-only samples whose rendered prompt is exactly PROMPT_LEN tokens."""
    from ekipl.models import hf
    from ekipl.tasks.prompts import render_prompt
    from ekipl.tasks.sample import Sample

    processor = hf.load_processor(path)
    tok = getattr(processor, "tokenizer", processor)
    words = sorted(t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    rng, out = random.Random(1), []
    while len(out) < n:
        s = Sample(id=f"p{len(out)}", task="counting", problem="", answer="1")
        text: list[str] = []
        while (have := len(tok(render_prompt(processor, s)).input_ids)) < PROMPT_LEN:
            text += rng.choices(words, k=PROMPT_LEN - have)
            s = Sample(id=s.id, task="counting", problem=" ".join(text), answer="1")
        if have == PROMPT_LEN:  # else a word split in two: draw this prompt again
            out.append(s)
    return out


def run_ekipl(a: argparse.Namespace) -> dict:
    import ray

    from bench.perf.trl_compare import ekipl_config
    from ekipl.data import ImageCheck, Sampler
    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.group import LearnerGroup
    from ekipl.models import hf
    from ekipl.models.tiny import build_tiny
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.rollout.policy import PolicyRouter
    from ekipl.train import StepParts

    lengths, path = draws(), str(build_tiny(MODEL))
    data, processor = samples(path, PROMPTS * (a.repeats + 1)), hf.load_processor(path)

    class DrawnLengths(RolloutCoordinator):
        """Each policy completion exactly as long as drawn: a group's G samples as G requests."""

        def _submit(self, requests, step):
            rows = [r for r in requests for _ in range(G)]
            # No seed: on a GPU each request's own seed would give a group's G requests one sample.
            pending = self.policy.submit(rows, n=1, temperature=1.0, max_tokens=lengths, ignore_eos=True)
            return Regrouped(pending)

    class Regrouped:
        def __init__(self, pending):
            self.pending = pending

        def result(self):
            out = self.pending.result()
            got = [len(c.token_ids) for (c,) in out]
            assert got == lengths and {len(c.prompt_token_ids) for (c,) in out} == {PROMPT_LEN}, got
            return [[c for (c,) in out[i : i + G]] for i in range(0, len(out), G)]

    cfg = ekipl_config(1)
    cfg.rollout.max_tokens = max(lengths)
    cfg.learner.max_tokens_per_micro_batch = BUDGET
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        router = PolicyRouter(vb.EngineSpec(model=path, dtype="float32", seed=0), replicas=1)
        learner = LearnerGroup(path, cfg.learner, cfg.algorithm)
        router.ready()
        learner.ready()
        coord = DrawnLengths(cfg.rollout, router, [], processor)
        sampler, images = Sampler(len(data), 0, False), ImageCheck(False)
        rows = [
            StepParts(cfg, data, sampler, images, coord, learner, router, processor).run(step)
            for step in range(1, a.repeats + 2)
        ][1:]
        coord.shutdown()
    finally:
        ray.shutdown()
    if any(m.get("actor/skipped_step") for m in rows):
        raise RuntimeError("DeepSpeed skipped an optimizer step")
    return {
        "step_s": statistics.median(m["timing/step"] for m in rows),
        "generate_s": statistics.median(m["timing/rollout"] for m in rows),
        "learner_s": statistics.median(m["timing/logprob"] + m["timing/update"] for m in rows),
        "sync_s": statistics.median(m["timing/weight_sync"] for m in rows),
        "generated_per_token": 1.0,  # vLLM stops each row at its own length
    }


class ForceLengths:
    """A transformers logits processor: row i of the generation batch ends with EOS exactly at its
    ``lengths[i]``-th token (EOS held back before it)."""

    def __init__(self, lengths: list[int], prompt_width: int, eos: list[int]):
        self.lengths, self.width, self.eos = torch.tensor(lengths), prompt_width, eos

    def __call__(self, input_ids, scores):
        made = input_ids.shape[1] - self.width  # tokens generated so far
        end = self.lengths - 1 == made
        scores[:, self.eos] = float("-inf")
        scores[end] = float("-inf")
        scores[end, self.eos[0]] = 0.0
        return scores


def run_trl(name: str, a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
    from trl import GRPOTrainer

    from bench.perf.trainers import grpo_config, step_clock
    from ekipl.models.tiny import build_tiny
    from ekipl.tasks.prompts import build_messages

    if VARIANTS[name]["compact"]:  # TRL's fused head on completion positions only, as with Triton
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True  # the tiles still run in torch
    lengths, path = draws(), str(build_tiny(MODEL))
    rows = [
        {"prompt": [{"role": m["role"], "content": m["content"][-1]["text"]} for m in build_messages(s)]}
        for s in samples(path, PROMPTS * (a.repeats + 1))
    ]
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    generate, gen_s, made = model.generate, [], []

    def timed_generate(*args, input_ids, generation_config, **kw):
        eos = generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        force = ForceLengths(lengths, input_ids.shape[1], eos)
        t0 = time.perf_counter()
        out = generate(
            *args,
            input_ids=input_ids,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([force]),
            **kw,
        )
        gen_s.append(time.perf_counter() - t0)
        completion = out[:, input_ids.shape[1] :]
        got = [int((row == eos[0]).nonzero()[0]) + 1 for row in completion]
        assert got == lengths and input_ids.shape[1] == PROMPT_LEN, (got, input_ids.shape)
        made.append(completion.numel() / sum(lengths))
        return out

    model.generate = timed_generate
    clock, step_times = step_clock()
    args = grpo_config(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=G * PROMPTS // 4,  # one optimizer step per batch, as ekipl's
        num_generations=G,
        max_completion_length=512,
        temperature=1.0,
        learning_rate=1e-6,
        gradient_checkpointing=not VARIANTS[name]["compact"],
        max_steps=a.repeats + 1,
        logging_steps=10**6,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[clock],
    )
    trainer.train()
    steps, gens = step_times()[1:], gen_s[1:]
    return {
        "step_s": statistics.median(steps),
        "generate_s": statistics.median(gens),
        "learner_s": statistics.median(s - g for s, g in zip(steps, gens, strict=True)),
        "sync_s": 0.0,
        "generated_per_token": statistics.median(made),
    }


def table(rows: list[dict]) -> str:
    lengths = draws()
    ref = next((r for r in rows if "as on this CPU" in r["variant"]), None)
    compl = next((r for r in rows if "completion positions" in r["variant"]), None)
    lines = [
        f"{MODEL}, {PROMPTS * G} sequences per step, {PROMPT_LEN}-token prompts, completions "
        f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), fp32, "
        f"{torch.get_num_threads()} threads; median of the steps after a warm-up.",
        "",
        "| trainer | step s | vs TRL CPU | vs TRL compl. | generation s | learner s | weight sync s "
        "| generated positions / token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = [f"{r['step_s'] / b['step_s']:.2f}x" if b else "-" for b in (ref, compl)]
        lines.append(
            f"| {r['variant']} | {r['step_s']:.2f} | {vs[0]} | {vs[1]} | {r['generate_s']:.2f} | "
            f"{r['learner_s']:.2f} | {r['sync_s']:.2f} | {r['generated_per_token']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # run one, in this process
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.variant:
        r = run_ekipl(a) if VARIANTS[a.variant]["kind"] == "ekipl" else run_trl(a.variant, a)
        Path(a.out).write_text(json.dumps({"variant": a.variant, **r}))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench.perf.real_step: TRL is missing; `make bench` installs the bench group", file=sys.stderr)
        return 2
    from ekipl.models.tiny import build_tiny

    build_tiny(MODEL)  # once, before any timing
    rows, failed = run_variants("bench.perf.real_step", VARIANTS, ["--repeats", str(a.repeats)])
    if rows:
        print(table(rows), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"model": MODEL, "rows": rows, "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
