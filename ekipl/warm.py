"""Warm starts: a tiny model after Reason-RFT's stage 1 (CoT-SFT on the synthetic traces), built
once with ``ekipl.sft`` and cached by recipe and seed, like the tiny models themselves.

Reason-RFT trains CoT-SFT first, then RL; a random-weight policy never produces the answer format,
so RL from scratch has no signal to work with. A warm-start name is accepted wherever a model path
is (``model.path=learn-qwen2-vl-sft``, ``aux.NAME.model=...``, ``ekipl.eval --model``): the first use
builds it (a subprocess runs ``python -m ekipl.sft``: its own local Ray, one learner rank), later
uses take it from ``$EKIPL_CACHE/models/<name>-s<seed>-<hash>`` (the hash covers the recipe and the
base model's spec, so a changed recipe never reuses a stale build). Builds are atomic.

The SFT data is the synthetic set of ``data_seed``: ``ekipl data make --seed 0 --n-train 512``
writes the same train rows, and its test splits are never trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """A CoT-SFT recipe on top of a tiny model."""

    base: str  # a tiny model name (ekipl.models.tiny), or another warm start's, to train on from it
    task: str = "counting"
    steps: int = 300
    lr: float = 1e-3
    prompts_per_step: int = 8
    data_size: int = 512  # synthetic train rows
    data_seed: int = 0
    # Train the language model only (``learner.freeze_vision``): on geometry's figures, at lr 1e-3,
    # the tiny vision tower collapsed to a constant (its image tokens' norm grew from 2 to 92 while
    # the difference between images fell from 20% to 0.5% of it), and the warm start answered blind.
    freeze_vision: bool = False


WARM_STARTS: dict[str, WarmStart] = {
    # The learning experiments' policy (bench/learn/learning.py, make demo): right about a third of the
    # time on held-out counting, with the format learned, so RL has room to improve.
    "learn-qwen2-vl-sft": WarmStart(base="learn-qwen2-vl", steps=300),
    # Its stronger auxiliary model, standing in for GPT-4o: the same recipe trained three times as
    # long (600 more steps from the policy's warm start). Right more often than the policy, but not
    # always.
    "learn-qwen2-vl-aux": WarmStart(base="learn-qwen2-vl-sft", steps=600),
    # The same pair for the other two families (structure perception and spatial transformation), on
    # each family's own synthetic rows (bench/learn/families.py); the auxiliary model is trained twice as
    # long, not three times. Their vision tower stays as built (random features), which the language
    # model learns to read: with it trained, geometry's warm start did not look at its images
    # (bench/LEARNING.md). TRANCE's read none of generators 1-4's small objects either way, and
    # read generator 5's, one object filling the frame. TRANCE's policy is built with the tokenizer
    # that has seen the tasks' prompts (learn-qwen2-vl-tok2): generator 4's prompt took 300 tokens
    # instead of 478 with it, and a warm-start step 1.31 s instead of 1.86 on 2 cores.
    # TRANCE's policy is trained 150 steps, not 300: at 300 it scored 0.72 and 0.90 (model.seed 0
    # and 1) on a dev split (data seed 1's test rows; the runs' test splits are data seed 0's), far
    # above the 20-50% a warm start should leave RL; at 150, 0.40 and 0.64; at 100, 0.20 (under that
    # split's majority answer, 0.23) and 0.35 (bench/LEARNING.md). Its auxiliary model stays 300 steps on.
    **{
        f"learn-qwen2-vl-{task}-{kind}": WarmStart(base=base, task=task, steps=steps, freeze_vision=True)
        for task, policy, policy_steps in (
            ("geometry", "learn-qwen2-vl", 300),
            ("trance", "learn-qwen2-vl-tok2", 150),
        )
        for kind, base, steps in (("sft", policy, policy_steps), ("aux", f"learn-qwen2-vl-{task}-sft", 300))
    },
}


def tiny_fields(name: str, seed: int) -> dict:
    """What a warm start's digest records of a tiny base model: its spec, with the corpus key."""
    from ekipl.models.tiny import spec_for, with_corpus_key

    spec = spec_for(name)
    return with_corpus_key(dataclasses.asdict(spec), spec, seed)


def _digest(name: str, recipe: WarmStart, seed: int) -> str:
    from ekipl.tasks.synth import VERSIONS

    base = WARM_STARTS.get(recipe.base)
    blob = {
        "name": name,
        "seed": seed,
        # freeze_vision at its default (False) is left out: the builds from before the field keep their names
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k != "freeze_vision" or v},
        "base": _digest(recipe.base, base, seed) if base else tiny_fields(recipe.base, seed),
        "v": 1,
    }
    if VERSIONS.get(recipe.task, 1) > 1:  # the rows it trains on changed (counting's hash stays)
        blob["data_version"] = VERSIONS[recipe.task]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def sft_overrides(recipe: WarmStart, seed: int, out: Path, base_path: str) -> list[str]:
    """The ``python -m ekipl.sft`` overrides of a recipe, training on from ``base_path``."""
    return [
        f"model.path={base_path}",
        f"model.seed={seed}",
        f"data.synthetic_task={recipe.task}",
        f"data.synthetic_size={recipe.data_size}",
        f"data.prompts_per_step={recipe.prompts_per_step}",
        f"trainer.steps={recipe.steps}",
        f"trainer.seed={recipe.data_seed}",
        f"trainer.output_dir={out}",
        f"learner.lr={recipe.lr}",
        "learner.world_size=1",
        "logger.mode=disabled",
        *(["learner.freeze_vision=true"] if recipe.freeze_vision else []),
    ]


def build_warm(name: str, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The directory of warm start ``name`` (built on first use; minutes on 2 cores)."""
    from ekipl.models.tiny import cache_root

    if name not in WARM_STARTS:
        raise ValueError(f"unknown warm start {name!r}; known: {', '.join(sorted(WARM_STARTS))}")
    recipe = WARM_STARTS[name]
    root = Path(root) if root is not None else cache_root() / "models"
    out = root / f"{name}-s{seed}-{_digest(name, recipe, seed)}"
    if (out / "ekipl_warm.json").is_file():
        return out
    base = str(build_warm(recipe.base, seed, root)) if recipe.base in WARM_STARTS else recipe.base
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        cmd = [sys.executable, "-m", "ekipl.sft", *sft_overrides(recipe, seed, tmp / "run", base)]
        print(f"[ekipl] building warm start {name} (CoT-SFT, {recipe.steps} steps) -> {out}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building warm start {name} failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
        shutil.copy2(tmp / "run" / "metrics.jsonl", tmp / "run" / "policy" / "sft_metrics.jsonl")
        meta = {"name": name, "seed": seed, "recipe": dataclasses.asdict(recipe)}
        (tmp / "run" / "policy" / "ekipl_warm.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp / "run" / "policy", out)
        except OSError:  # another process finished the same build first; its output is equivalent
            if not (out / "ekipl_warm.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
