"""One-step-off rollout (``rollout.one_step_off``): the policy's generation for the next step,
started before the learner updates, with the weights that produced the current batch (verl's
one-step-off-policy rollout). :class:`EarlyRollouts` holds it until that step's rollout takes it, and
carries a finished one through a checkpoint, so a resumed run samples what an uninterrupted one
would have."""

from __future__ import annotations

import dataclasses
import logging

from ekipl.engines import vllm_backend as vb
from ekipl.tasks.sample import Sample

log = logging.getLogger("ekipl.rollout.coordinator")


@dataclasses.dataclass
class EarlyRollout:
    """The policy's generation for a coming step: in flight (``pending``) or finished (``done``)."""

    step: int
    sample_ids: tuple[str, ...]
    pending: object = None  # a PolicyRouter.submit handle
    done: list[list[vb.Completion]] | None = None

    def completions(self) -> list[list[vb.Completion]]:
        return self.pending.result() if self.done is None else self.done  # result() keeps its answer


class EarlyRollouts:
    def __init__(self):
        self._early: EarlyRollout | None = None

    def start(self, step: int, samples: list[Sample], pending) -> None:
        self._early = EarlyRollout(step, tuple(s.id for s in samples), pending)

    def take(self, samples: list[Sample], step: int) -> list[list[vb.Completion]] | None:
        """The early completions if they are this step's batch (else None: generate again)."""
        early, self._early = self._early, None
        if early is None:
            return None
        out = early.completions()  # also when unused: a failed engine is reported, never skipped
        if (early.step, early.sample_ids) != (step, tuple(s.id for s in samples)):
            log.warning(
                "the early rollout (step %d, samples %s) is not step %d's batch: generating again",
                early.step,
                list(early.sample_ids),
                step,
            )
            return None
        return out

    def state(self) -> dict | None:
        """The early rollout for the next step, finished, as JSON-able data (for a checkpoint)."""
        if self._early is None:
            return None
        return {
            "step": self._early.step,
            "sample_ids": list(self._early.sample_ids),
            "completions": [[dataclasses.asdict(c) for c in comps] for comps in self._early.completions()],
        }

    def restore(self, state: dict | None) -> None:
        """Undo :meth:`state` (a resumed run continues with the early rollout it had saved)."""
        if state:
            done = [[vb.Completion(**c) for c in comps] for comps in state["completions"]]
            self._early = EarlyRollout(state["step"], tuple(state["sample_ids"]), done=done)

    def clear(self) -> None:
        self._early = None
