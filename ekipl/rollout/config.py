"""Rollout configuration (``rollout.*``; registered with Hydra's ConfigStore by ekipl.config),
beside the coordinator that reads it, as the learner's is beside the learner."""

from __future__ import annotations

import dataclasses

from ekipl.rollout import selection


@dataclasses.dataclass
class RolloutConfig:
    n: int = 8  # policy samples per prompt
    group_size: int = 8  # G, the selected group's size (topg)
    temperature: float = 0.9
    max_tokens: int = 512
    # Auxiliary actions (e.g. recorded CoT traces) may be longer than the policy's budget; longer
    # ones are cut here (and scored as cut) to bound learner memory.
    aux_max_tokens: int = 2048
    selection: str = "topg"
    num_replace: int = 1
    drop_tied: bool = True
    aux_on_demand: bool = False
    pass_threshold: float = 0.5  # aux_on_demand: query aux only when the policy pass rate is below
    # Gated guidance: query aux only for prompts whose policy pass rate is at or below this (0: every
    # policy sample failed); on demand, after the policy's samples are scored. None: off.
    gate_threshold: float | None = None
    # On-demand guidance, its latency hidden: at a batch's prefetch, start the auxiliary requests for
    # the prompts that needed guidance at their last visit (an epoch ago); a prompt that needs it now
    # and was not started is asked on demand. Answers started for a prompt that no longer needs them
    # are not used (they are counted as requests, and kept in the action cache).
    gate_prefetch: bool = False
    # Dynamic sampling (DAPO; verl's filter_groups): while fewer than the batch's prompts have groups
    # with signal, roll out the next batch of prompts too, up to max_sample_rounds batches in all;
    # the first groups with signal, up to the batch's prompts, train.
    dynamic_sampling: bool = False
    max_sample_rounds: int = 3
    system_prompt: bool = False
    prefetch: bool = True
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: every policy completion is exactly max_tokens long
    # Generate the next batch's policy actions (with the weights before this step's update) while
    # the learner updates: hides rollout behind the update where they run on different devices;
    # the actions are one update stale. See bench/RESULTS.md for what it gains on CPU.
    one_step_off: bool = False
    # Bounded staleness: the policy's rollouts of the next N batches run ahead on the engines while
    # the learner updates; a rollout is used only if its weights are at most N updates old (older
    # ones are dropped and generated again, counted in rollout/stale_dropped). 0: off; N=1 is
    # one_step_off.
    max_staleness: int = 0

    def __post_init__(self):
        if self.selection not in selection.RULES:
            raise ValueError(f"rollout.selection: unknown {self.selection!r}; known: {selection.RULES}")
        if self.n < 1 or self.group_size < 1 or self.max_tokens < 1:
            raise ValueError("rollout.n, rollout.group_size and rollout.max_tokens must be >= 1")
        if self.max_sample_rounds < 1:
            raise ValueError("rollout.max_sample_rounds must be >= 1")
        if self.gate_threshold is not None and not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"rollout.gate_threshold must be in [0, 1] (or null), got {self.gate_threshold}")
        if self.gate_prefetch and not self.on_demand:
            raise ValueError(
                "rollout.gate_prefetch: only with on-demand guidance (rollout.gate_threshold or "
                "rollout.aux_on_demand); prefetched guidance is already started early"
            )
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.one_step_off and self.max_staleness not in (0, 1):
            raise ValueError(
                f"rollout.one_step_off is rollout.max_staleness=1; with rollout.max_staleness="
                f"{self.max_staleness} leave rollout.one_step_off unset"
            )
        if self.dynamic_sampling and self.ahead:
            raise ValueError(
                "rollout.dynamic_sampling: not with rollout.one_step_off or rollout.max_staleness (the "
                "early rollouts are of the next batches, which the extra rounds take)"
            )

    @property
    def ahead(self) -> int:
        """How many batches' policy rollouts run ahead of the update (``max_staleness``, or 1 with
        ``one_step_off``): the one place this is derived."""
        return self.max_staleness or int(self.one_step_off)

    @property
    def on_demand(self) -> bool:
        """Auxiliary actions are asked for after the policy's samples are scored (no prefetch)."""
        return self.aux_on_demand or self.gate_threshold is not None

    def needs_guidance(self, pass_rate: float) -> bool:
        if self.gate_threshold is not None:
            return pass_rate <= self.gate_threshold + 1e-9
        return pass_rate < self.pass_threshold
