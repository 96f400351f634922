"""Selecting the group that trains: pure functions over scored candidates (no Ray, no I/O).

* ``all``:     keep every candidate.
* ``topg``:    keep the G best by reward; ties go to policy actions first, then to earlier
  candidates (the paper's rule).
* ``replace``: LUFFY-style: start from the policy's actions and swap the ``num_replace`` worst of
  them for the best auxiliary actions (when there are fewer auxiliary actions, swap fewer).

``all_tied`` tells whether a group carries no learning signal (every reward equal), so the
coordinator can drop it.
"""

from __future__ import annotations

from ekipl.types import Action

RULES = ("all", "topg", "replace")


def _rank_key(pair: tuple[int, Action]):
    i, a = pair
    return (-a.reward, 0 if a.is_policy else 1, i)


def select(candidates: list[Action], rule: str, group_size: int, num_replace: int = 1) -> list[Action]:
    if rule == "all":
        return list(candidates)
    if rule == "topg":
        ranked = sorted(enumerate(candidates), key=_rank_key)
        return [a for _, a in ranked[:group_size]]
    if rule == "replace":
        policy = [a for a in candidates if a.is_policy]
        aux = sorted((a for a in candidates if not a.is_policy), key=lambda a: -a.reward)
        n = min(num_replace, len(aux), len(policy))
        keep = sorted(enumerate(policy), key=_rank_key)[: len(policy) - n]
        return [a for _, a in sorted(keep)] + aux[:n]
    raise ValueError(f"rollout.selection: unknown rule {rule!r}; known: {RULES}")


def best(actions: list[Action]) -> Action | None:
    """The top action under the ``topg`` order (reward, then policy first, then earlier)."""
    return min(enumerate(actions), key=_rank_key)[1] if actions else None


def all_tied(actions: list[Action], tol: float = 1e-9) -> bool:
    return len(actions) < 2 or max(a.reward for a in actions) - min(a.reward for a in actions) <= tol


def pass_rate(actions: list[Action], threshold: float = 1.0) -> float:
    """Share of policy actions whose accuracy reaches ``threshold``."""
    pol = [a for a in actions if a.is_policy]
    return sum(a.accuracy >= threshold - 1e-9 for a in pol) / len(pol) if pol else 0.0
