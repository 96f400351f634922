"""ekipl against TRL's GRPOTrainer: time per step and tokens/s, side by side in one run.

    .venv/bin/python -m bench.perf.trl_compare [--repeats 3] [--models tiny-qwen2 bench-qwen2-75m]

The same for both sides: the policy (a text-only Qwen2 built locally with random weights), the
prompts (the synthetic counting problems' text), G=8 completions for each of 2 prompts per step,
64 forced completion tokens (EOS ignored), β=0 (no reference model), AdamW at lr 1e-6, one update
per step over all 16 completions, the format reward. ekipl runs its own step (``ekipl.train.StepParts.run``:
a vLLM engine in a Ray actor, DeepSpeed ZeRO-2 learner ranks in Ray actors, weight sync) with 1 and
with 2 learner ranks; TRL runs in this process with transformers ``generate`` (its vLLM paths need a
GPU). Each figure is the median of ``--repeats`` steps after one warm-up step. TRL comes from the
``bench`` dependency group (``make bench`` installs it; ``make test`` does not).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.perf.trainers import grpo_config, step_clock

ROOT = Path(__file__).resolve().parents[2]
G, PROMPTS, TOKENS, LR = 8, 2, 64, 1e-6


def prompts(n: int) -> list:
    """Text-only samples from the synthetic counting problems (images dropped)."""
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.sample import Sample
    from ekipl.tasks.synth import make_dataset

    out = Path(tempfile.mkdtemp(prefix="ekipl-bench-trl-"))
    paths = make_dataset("counting", out, n_train=n, n_test=4, seed=0)
    return [
        Sample(id=s.id, task="counting", problem=s.problem, answer=s.answer, cot=s.cot)
        for s in load_task_file(paths["train"])
    ]


def ekipl_config(world_size: int, one_step_off: bool = False):
    """The trainer's config for this workload: the same G, tokens, β, optimizer as TRL's side."""
    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.config import RunConfig
    from ekipl.learner.config import LearnerConfig
    from ekipl.rollout.config import RolloutConfig

    cfg = RunConfig()
    cfg.data.prompts_per_step = PROMPTS
    cfg.learner = LearnerConfig(
        world_size=world_size, zero_stage=2, lr=LR, micro_batch_size=G * PROMPTS // world_size
    )
    cfg.algorithm = ObjectiveConfig(kl_coef=0.0)
    cfg.rollout = RolloutConfig(
        n=G,
        group_size=G,
        max_tokens=TOKENS,
        temperature=1.0,
        drop_tied=False,
        ignore_eos=True,
        one_step_off=one_step_off,
    )
    return cfg


def run_steps(cfg, samples: list, router, learner, processor, repeats: int) -> list[dict]:
    """The trainer's step function ``repeats`` times after one warm-up step; their metrics."""
    from ekipl.data import ImageCheck, Sampler
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.train import StepParts

    learner.sync_weights(router.actors)  # the engine may hold another learner's weights
    coord = RolloutCoordinator(cfg.rollout, router, [], processor)
    sampler, images = Sampler(len(samples), 0, True), ImageCheck(False)
    out = []
    for step in range(1, repeats + 2):
        m = StepParts(cfg, samples, sampler, images, coord, learner, router, processor).run(step)
        if step > 1:
            out.append(m)
    coord.shutdown()
    return out


def ekipl_steps(model: str, samples: list, worlds: list[int], repeats: int) -> dict[int, tuple[list, list]]:
    """For each learner world size: step times and the learner's share of them (log-probs +
    update), after one warm-up step. One engine serves every world size (the sync at the start of
    each gives it that learner's weights)."""
    import ray

    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.group import LearnerGroup
    from ekipl.models import hf
    from ekipl.rollout.policy import PolicyRouter

    processor = hf.load_processor(model)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        router = PolicyRouter(vb.EngineSpec(model=model, dtype="float32", seed=0), replicas=1)
        router.ready()
        out = {}
        for world_size in worlds:
            cfg = ekipl_config(world_size)
            learner = LearnerGroup(model, cfg.learner, cfg.algorithm)
            learner.ready()
            rows = run_steps(cfg, samples, router, learner, processor, repeats)
            learner.shutdown()
            out[world_size] = (
                [m["timing/step"] for m in rows],
                [m["timing/logprob"] + m["timing/update"] for m in rows],
            )
        for a in router.actors:
            ray.kill(a)
        return out
    finally:
        ray.shutdown()


def _user_text(sample) -> str:
    from ekipl.tasks.prompts import build_messages

    content = build_messages(sample)[-1]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


def trl_steps(model: str, samples: list, repeats: int) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from ekipl.tasks.rewards import format_reward

    tok = AutoTokenizer.from_pretrained(model)
    rows = [{"prompt": [{"role": "user", "content": _user_text(s)}]} for s in samples]
    clock, step_times = step_clock()

    def reward(completions, **kw):
        return [format_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    args = grpo_config(
        per_device_train_batch_size=G * PROMPTS,
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=TOKENS,
        generation_kwargs={"min_new_tokens": TOKENS},  # forced length, as ekipl's ignore_eos
        temperature=1.0,
        learning_rate=LR,
        max_steps=repeats + 1,
        logging_steps=1,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.train()
    return step_times()[1:]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["tiny-qwen2", "bench-qwen2-75m"])
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print(
            "bench.perf.trl_compare: TRL is missing; `make bench` installs the bench group", file=sys.stderr
        )
        return 2
    from ekipl.models import hf
    from ekipl.models.tiny import build_tiny

    samples = prompts(16)
    tokens = G * PROMPTS * TOKENS
    rows = []
    for name in args.models:
        path = str(build_tiny(name))
        params = sum(p.numel() for p in hf.load_model(path).parameters())
        trl_t = statistics.median(trl_steps(path, samples, args.repeats))
        print(f"  {name}: TRL {trl_t:.2f}s per step", file=sys.stderr, flush=True)
        for world, (times, learn) in ekipl_steps(path, samples, [1, 2], args.repeats).items():
            t, lt = statistics.median(times), statistics.median(learn)
            print(f"  {name}: ekipl ({world} rank) {t:.2f}s per step", file=sys.stderr, flush=True)
            rows.append((name, params, world, t, lt, trl_t))
    print(table(rows, tokens))
    return 0


def table(rows, tokens: int) -> str:
    lines = [
        "| policy | params | ekipl learner ranks | ekipl s/step | of which learner s | TRL s/step "
        "| ekipl tok/s | TRL tok/s | ekipl / TRL time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, params, world, t, lt, trl_t in rows:
        lines.append(
            f"| {name} | {params / 1e6:.1f}M | {world} | {t:.2f} | {lt:.2f} | {trl_t:.2f} | "
            f"{tokens / t:.0f} | {tokens / trl_t:.0f} | {t / trl_t:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
