"""The records that rollout produces and the learner consumes."""

from __future__ import annotations

import dataclasses

from ekipl.tasks.sample import Sample

POLICY = "policy"


@dataclasses.dataclass
class Action:
    """One candidate answer in a group.

    ``token_ids`` are in the *policy's* tokenizer (auxiliary text is re-tokenized), ending with the
    policy's end-of-turn token when the answer is complete (``truncated`` when it is not).
    ``sampling_logprobs`` exist only for policy actions.
    """

    source: str
    token_ids: list[int]
    text: str
    reward: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    sampling_logprobs: list[float] | None = None
    truncated: bool = False  # cut at its length budget before its end token
    # A policy action: how many updates old the weights that sampled it were (0: the current ones;
    # rollouts ahead of the update, rollout.max_staleness, sample with older ones).
    staleness: int = 0

    @property
    def is_policy(self) -> bool:
        return self.source == POLICY


@dataclasses.dataclass
class Group:
    """The selected actions for one prompt. ``prompt`` is the policy's chat text with placeholders."""

    sample: Sample
    prompt: str
    actions: list[Action]
