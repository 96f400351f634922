"""Selecting the group that trains: pure functions over scored candidates (no Ray, no I/O).

* ``all``:     keep every candidate.
* ``topg``:    keep the G best by reward; ties go to policy actions first, then to earlier
  candidates (the paper's rule).
* ``replace``: LUFFY-style: start from the policy's actions and swap the ``num_replace`` worst of
  them for the best auxiliary actions (when there are fewer auxiliary actions, swap fewer).
* ``replace_failed``: the gated variant (AMPO, HPT): swap only failed policy actions (accuracy
  below 1), worst first, each for a better-rewarded auxiliary action, at most ``num_replace``; a
  correct policy action is never displaced.

``all_tied`` tells whether a group carries no learning signal (every reward equal), so the
coordinator can drop it.
"""

from __future__ import annotations

from ekipl.types import Action

RULES = ("all", "topg", "replace", "replace_failed")


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
    if rule == "replace_failed":
        return _replace_failed(candidates, num_replace)
    raise ValueError(f"rollout.selection: unknown rule {rule!r}; known: {RULES}")


def _replace_failed(candidates: list[Action], num_replace: int) -> list[Action]:
    policy = list(enumerate(a for a in candidates if a.is_policy))
    aux = sorted((a for a in candidates if not a.is_policy), key=lambda a: -a.reward)
    failed = sorted((p for p in policy if p[1].accuracy < 1.0 - 1e-9), key=_rank_key, reverse=True)
    swapped: dict[int, Action] = {}
    for (i, worst), ext in zip(failed, aux, strict=False):
        if len(swapped) >= num_replace or ext.reward <= worst.reward:
            break
        swapped[i] = ext
    return [swapped.get(i, a) for i, a in policy]


def best(actions: list[Action]) -> Action | None:
    """The top action under the ``topg`` order (reward, then policy first, then earlier)."""
    return min(enumerate(actions), key=_rank_key)[1] if actions else None


def all_tied(actions: list[Action], tol: float = 1e-9) -> bool:
    return len(actions) < 2 or max(a.reward for a in actions) - min(a.reward for a in actions) <= tol


def pass_rate(actions: list[Action], threshold: float = 1.0) -> float:
    """Share of policy actions whose accuracy reaches ``threshold``."""
    pol = [a for a in actions if a.is_policy]
    return sum(a.accuracy >= threshold - 1e-9 for a in pol) / len(pol) if pol else 0.0
