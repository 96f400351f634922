"""The worker process of a user's reward function (:class:`ekipl.tasks.scorer.UserReward`).

``python -m ekipl.tasks.reward_worker FILE NAME`` reads the function's kwargs (the first frame on
stdin), imports ``FILE``, tells the function's contract (:mod:`ekipl.tasks.contracts`) and answers
``("ok", contract)`` or ``("error", why)``, then answers each ``(completions, samples, lengths)``
frame with ``("ok", [("ok", value) | ("error", why), ...])``, or ``("error", why)`` when a batched
call failed whole. What the function prints goes to stderr, so it
never corrupts the frames on stdout.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def load(file: str, name: str):
    """The function ``name`` of the Python file ``file`` (raises ValueError with the reason)."""
    spec = importlib.util.spec_from_file_location(f"ekipl_user_reward_{abs(hash(file))}", file)
    if spec is None or spec.loader is None:
        raise ValueError(f"{file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{file} failed to import: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{file} has no function {name!r}")
    if not callable(fn):
        raise ValueError(f"{file}: {name!r} is not callable")
    return fn


def main(argv: list[str]) -> None:
    from ekipl.tasks.contracts import ContractError, call, describe, detect
    from ekipl.tasks.scorer import receive, send

    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the protocol's own copy of stdout
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to stderr
    inp = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    kwargs = receive(inp)  # reward.function_kwargs, sent first
    try:
        fn = load(argv[0], argv[1])
        contract = detect(fn, kwargs)
    except (ValueError, ContractError) as e:
        send(out, ("error", str(e)))
        return
    send(out, ("ok", contract))
    while True:
        try:
            completions, samples, lengths = receive(inp)
        except EOFError:
            return
        try:
            send(out, ("ok", call(contract, fn, completions, samples, kwargs, lengths)))
        except Exception as e:  # noqa: BLE001 -- a batched call failed: reported, counted per completion
            try:
                send(out, ("error", describe(e)))
            except Exception:  # an unpicklable error text
                send(out, ("error", f"{type(e).__name__} (unprintable)"))


if __name__ == "__main__":
    main(sys.argv[1:])
