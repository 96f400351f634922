"""The calling contracts a ``reward.function`` may have, told apart by its signature
(``inspect.signature``), so a reward file written for verl or EasyR1 runs as it is.

=============  ==========================================================================
contract       the function, and how ekipl calls it
=============  ==========================================================================
``ekipl``      ``fn(completion, sample, **kwargs) -> float | dict`` (ekipl's own; see
               :mod:`ekipl.tasks.scorer`), once per completion
``batch``      ``fn(completions, samples, **kwargs) -> list[float | dict]``, once per batch
               (a reward that calls a model wants the whole batch)
``verl``       ``compute_score(data_source, solution_str, ground_truth, extra_info=None,
               **kwargs) -> float | dict``: ``data_source`` is the sample's task,
               ``ground_truth`` its answer, ``extra_info`` the row's other columns; a dict
               result gives ``score`` (and ``acc``, the accuracy, when it has one)
``easyr1``     ``compute_score(reward_input: dict, **kwargs) -> dict`` (EasyR1's
               ``reward_type=sequential``): ``reward_input`` holds ``response``,
               ``response_length`` (tokens, where known) and ``ground_truth``; the result's
               ``overall``, ``accuracy`` and ``format``
``easyr1_batch`` ``compute_score(reward_inputs: list[dict], **kwargs) -> list[dict]``
               (EasyR1's ``reward_type=batch``), once per batch
=============  ==========================================================================

Results are brought to ekipl's form (a number, or a dict of ``total``, ``accuracy``, ``format``)
here; :func:`ekipl.tasks.rewards.to_reward` checks them. Pure Python: the reward worker process
imports it without torch.
"""

from __future__ import annotations

import inspect

CONTRACTS = {
    "ekipl": "fn(completion, sample, **kwargs) -> float | dict",
    "batch": "fn(completions, samples, **kwargs) -> list[float | dict]",
    "verl": "compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float|dict",
    "easyr1": "compute_score(reward_input: dict, **kwargs) -> dict (EasyR1 sequential)",
    "easyr1_batch": "compute_score(reward_inputs: list[dict], **kwargs) -> list[dict] (EasyR1 batch)",
}
BATCHED = ("batch", "easyr1_batch")


class ContractError(ValueError):
    """A function that no accepted contract can call (the message lists them)."""


def accepted() -> str:
    return "; ".join(f"{k}: {v}" for k, v in CONTRACTS.items())


def _probe_args(contract: str) -> tuple[tuple, dict]:
    return {
        "ekipl": (("c", "s"), {}),
        "batch": ((["c"], ["s"]), {}),
        "verl": ((), {"data_source": "t", "solution_str": "c", "ground_truth": "a", "extra_info": {}}),
        "easyr1": (({},), {}),
        "easyr1_batch": (([{}],), {}),
    }[contract]


def detect(fn, kwargs: dict | None = None) -> str:
    """The contract ``fn`` is written to, checked against ``kwargs`` (``reward.function_kwargs``)
    by binding its signature; raises :class:`ContractError` when none fits."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ContractError(f"its signature cannot be read ({e}); accepted contracts: {accepted()}") from None
    names = [
        p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if names[:1] == ["reward_inputs"]:
        contract = "easyr1_batch"
    elif names[:1] == ["reward_input"]:
        contract = "easyr1"
    elif {"solution_str", "ground_truth"} <= set(sig.parameters):
        contract = "verl"
    elif names[:2] == ["completions", "samples"]:
        contract = "batch"
    else:
        contract = "ekipl"
    args, kw = _probe_args(contract)
    try:
        sig.bind(*args, **kw, **(kwargs or {}))
    except TypeError as e:
        raise ContractError(
            f"{fn.__name__}{sig} cannot be called as the {contract!r} contract ({e}); accepted contracts: "
            f"{accepted()}"
        ) from None
    return contract


def _verl(value):
    if isinstance(value, dict) and "score" in value:
        out = {"total": value["score"]}
        if "acc" in value:
            out["accuracy"] = float(value["acc"])
        return out
    return value


def _easyr1(value):
    if isinstance(value, dict) and "overall" in value:
        return {
            k2: value[k1]
            for k1, k2 in (("overall", "total"), ("accuracy", "accuracy"), ("format", "format"))
            if k1 in value
        }
    return value


def _easyr1_input(completion: str, sample, length: int | None) -> dict:
    d = {"response": completion, "ground_truth": sample.answer}
    if length is not None:
        d["response_length"] = length
    return d


def call(
    contract: str, fn, completions: list, samples: list, kwargs: dict, lengths: list | None = None
) -> list:
    """Score the batch with ``fn`` under ``contract``: one ``("ok", value)`` or ``("error",
    message)`` per completion, values in ekipl's form. An exception of a batched call fails every
    completion of the batch; a per-completion one fails that completion only."""
    lengths = lengths or [None] * len(completions)
    if contract in BATCHED:
        if contract == "batch":
            values = fn(list(completions), list(samples), **kwargs)
        else:
            inputs = [_easyr1_input(c, s, n) for c, s, n in zip(completions, samples, lengths, strict=True)]
            values = [_easyr1(v) for v in fn(inputs, **kwargs)]
        values = list(values)
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} scores for {len(completions)} completions")
        return [("ok", v) for v in values]
    out = []
    for c, s, n in zip(completions, samples, lengths, strict=True):
        try:
            if contract == "verl":
                v = _verl(
                    fn(
                        data_source=s.task,
                        solution_str=c,
                        ground_truth=s.answer,
                        extra_info=dict(s.meta),
                        **kwargs,
                    )
                )
            elif contract == "easyr1":
                v = _easyr1(fn(_easyr1_input(c, s, n), **kwargs))
            else:
                v = fn(c, s, **kwargs)
            out.append(("ok", v))
        except Exception as e:  # noqa: BLE001 -- counted by the scorer, never fatal
            out.append(("error", describe(e)))
    return out


def describe(e: BaseException) -> str:
    import os
    import traceback

    last = traceback.extract_tb(e.__traceback__)[-1:]
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"
