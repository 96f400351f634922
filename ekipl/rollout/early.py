"""Rollouts ahead of the update: one-step-off (``rollout.one_step_off``) and bounded staleness
(``rollout.max_staleness=N``).

The policy's generation for each of the next N steps' batches starts before the learner updates,
with the weights the engines have then (verl's one-step-off and fully-async rollouts, under a
staleness bound). :class:`EarlyRollouts` holds them until their step's rollout takes them. A rollout
started at step s (the engines then hold the weights after update s − 1) and taken at step t was
sampled with weights t − s updates old: its staleness. One older than the bound (a resumed run with
a smaller N) is dropped, counted, and generated again. Finished rollouts go into checkpoints, so a
resumed run samples what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging

from ekipl.engines import vllm_backend as vb
from ekipl.tasks.sample import Sample

log = logging.getLogger("ekipl.rollout.coordinator")


@dataclasses.dataclass
class EarlyRollout:
    """The policy's generation for a coming step: in flight (``pending``) or finished (``done``);
    ``started``: the step at which it was started (its weights: after update ``started - 1``)."""

    step: int
    sample_ids: tuple[str, ...]
    pending: object = None  # a PolicyRouter.submit handle
    done: list[list[vb.Completion]] | None = None
    started: int | None = None

    def completions(self) -> list[list[vb.Completion]]:
        return self.pending.result() if self.done is None else self.done  # result() keeps its answer


class EarlyRollouts:
    def __init__(self, max_staleness: int = 1):
        self.max_staleness = max_staleness
        self._by_step: dict[int, EarlyRollout] = {}
        self.stale_dropped = 0

    def has(self, step: int) -> bool:
        return step in self._by_step

    def start(self, step: int, samples: list[Sample], pending, started: int) -> None:
        self._by_step[step] = EarlyRollout(step, tuple(s.id for s in samples), pending, started=started)

    def take(self, samples: list[Sample], step: int) -> tuple[list[list[vb.Completion]], int] | None:
        """Step ``step``'s early completions and their staleness, if they are this batch's and fresh
        enough (else None: generate again)."""
        early = self._by_step.pop(step, None)
        for old in [s for s in self._by_step if s < step]:  # rollouts for steps gone by: let go
            self._by_step.pop(old).completions()
        if early is None:
            return None
        out = early.completions()  # also when unused: a failed engine is reported, never skipped
        if early.sample_ids != tuple(s.id for s in samples):
            log.warning(
                "the early rollout for step %d (samples %s) is not its batch: generating again",
                step,
                list(early.sample_ids),
            )
            return None
        staleness = step - (early.started if early.started is not None else step - 1)
        if staleness > self.max_staleness:
            self.stale_dropped += 1
            log.warning(
                "the early rollout for step %d is %d updates old (rollout.max_staleness=%d): dropped, "
                "generating again",
                step,
                staleness,
                self.max_staleness,
            )
            return None
        return out, staleness

    def state(self) -> list[dict]:
        """The early rollouts, finished, as JSON-able data (for a checkpoint)."""
        return [
            {
                "step": e.step,
                "sample_ids": list(e.sample_ids),
                "started": e.started,
                "completions": [[dataclasses.asdict(c) for c in comps] for comps in e.completions()],
            }
            for _, e in sorted(self._by_step.items())
        ]

    def restore(self, state: list[dict] | dict | None) -> None:
        """Undo :meth:`state` (a checkpoint of one-step-off's single early rollout, a dict, too)."""
        for item in [state] if isinstance(state, dict) else state or []:
            done = [[vb.Completion(**c) for c in comps] for comps in item["completions"]]
            started = item.get("started", item["step"] - 1)
            self._by_step[item["step"]] = EarlyRollout(
                item["step"], tuple(item["sample_ids"]), done=done, started=started
            )

    def clear(self) -> None:
        self._by_step.clear()
