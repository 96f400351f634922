"""The worker process of a user's reward function (:class:`ekipl.tasks.scorer.UserReward`).

``python -m ekipl.tasks.reward_worker FILE NAME`` imports ``FILE``, answers ``("ok", None)`` or
``("error", why)``, then answers each ``(completion, sample, kwargs)`` frame on stdin with
``("ok", result)`` or ``("error", "Type: message")``. What the function prints goes to stderr, so it
never corrupts the frames on stdout.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback


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
    from ekipl.tasks.scorer import receive, send

    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the protocol's own copy of stdout
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to stderr
    inp = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    try:
        fn = load(argv[0], argv[1])
    except ValueError as e:
        send(out, ("error", str(e)))
        return
    send(out, ("ok", None))
    while True:
        try:
            completion, sample, kwargs = receive(inp)
        except EOFError:
            return
        try:
            send(out, ("ok", fn(completion, sample, **kwargs)))
        except Exception as e:  # noqa: BLE001 -- reported to the scorer, which counts it
            last = traceback.extract_tb(e.__traceback__)[-1:]
            where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
            try:
                send(out, ("error", f"{type(e).__name__}: {e}{where}"))
            except Exception:  # an unpicklable result or error text
                send(out, ("error", f"{type(e).__name__} (unprintable){where}"))


if __name__ == "__main__":
    main(sys.argv[1:])
