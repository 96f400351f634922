"""Helpers the trainer benchmarks share (bench/perf/learner.py, bench/perf/trl_compare.py,
bench/perf/real_step.py, bench/perf/gpu.py): a clock that waits for the GPU, a TRL callback timing
optimizer steps, and TRL's GRPOConfig as ekipl's side runs."""

from __future__ import annotations

import tempfile
import time

import torch


def cuda_sync() -> None:
    """Wait for the GPU's queued work, where there is one (before reading a clock)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_clock():
    """A TrainerCallback recording each optimizer step's start and end, and a function returning
    the steps' wall times."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            cuda_sync()
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            cuda_sync()
            stamps.append(time.perf_counter())

    return Clock(), lambda: [b - a for a, b in zip(stamps[::2], stamps[1::2], strict=True)]


def grpo_config(**kw):
    """TRL's GRPOConfig as ekipl's side runs: constant lr, β 0, one update per batch, on the CPU in
    fp32, no saving, logging or progress bars; ``kw`` sets the rest."""
    from trl import GRPOConfig

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="ekipl-bench-trl-out-"),
        lr_scheduler_type="constant",
        beta=0.0,
        num_iterations=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    return GRPOConfig(**{**common, **kw})
