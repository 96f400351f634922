"""One path that scores every completion: the reward registry, a user's reward file, and the guards.

**The reward function's contract** (the built-in task rewards of :data:`~ekipl.tasks.rewards.REWARDS`
have it too)::

    def my_reward(completion: str, sample: Sample, **kwargs) -> float | dict: ...

* ``completion``: the action's text (the policy's, an auxiliary model's or a recorded trace).
* ``sample``: the problem (:class:`~ekipl.tasks.sample.Sample`): ``problem``, ``answer`` (the ground
  truth), ``image_paths``, ``task``, ``id`` and ``meta``, the row's other columns.
* ``kwargs``: ``reward.function_kwargs`` from the config.
* It returns a number, the total reward (also logged as the accuracy, which ``ekipl.eval`` and
  validation count as solved at 1.0), or a dict with ``total`` and optionally ``accuracy`` and
  ``format``; a missing ``accuracy`` is the total, a missing ``format`` is ekipl's format check of the
  completion (``reward.format_rule``), logged and never added. They are logged per source as
  ``reward/<source>/{mean,accuracy,format}``, like the built-in ones.

**Other contracts.** A reward file written for verl (``compute_score(data_source, solution_str,
ground_truth, extra_info)``) or EasyR1 (``compute_score(reward_input)`` or
``compute_score(reward_inputs)``), or a batch form ``fn(completions, samples)`` called once per
batch, is called the way it is written: :mod:`ekipl.tasks.contracts` tells them apart by the
signature. A function no contract can call, or one whose call on the first real row fails, is
refused at start-up (``reward.function``, exit 2), listing the contracts accepted.

``reward.function=path/to/file.py:name`` loads it once at start-up (a missing file or name is a
:class:`RewardFunctionError` naming the key) and it then scores every sample, whatever its task.
It runs in a worker process of its own (:mod:`ekipl.tasks.reward_worker`): a call that raises,
returns a non-number or a non-finite value, or runs past ``reward.timeout_s`` (the worker is then
killed and started again) scores 0 for that action. Each fault is counted (``reward/errors``) and
logged once per kind with its error; it never stops the run. Without ``reward.function``, a
sample's task names its built-in entry, which runs in this process (they never raise or hang).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
from pathlib import Path

from .rewards import REWARDS, ZERO, Reward, RewardWeights, entry_kwargs, to_reward
from .sample import Sample

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")


class RewardFunctionError(ValueError):
    """A reward function named in config cannot be loaded (the message names the key)."""


def send(stream, obj) -> None:
    """One length-prefixed pickle frame (the worker's protocol)."""
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(blob)) + blob)
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("the reward worker closed its pipe")
        buf += chunk
    return buf


def receive(stream):
    (n,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, n))


def parse_spec(spec: str, key: str = "reward.function") -> tuple[Path, str]:
    """``path/to/file.py:name`` -> (the file, the function's name), checked to exist."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise RewardFunctionError(f"{key}: expected 'path/to/file.py:function_name', got {spec!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardFunctionError(f"{key}: no such file: {file}")
    return file.resolve(), name


class UserReward:
    """A user's reward function in a worker process, called one completion at a time under a time
    limit. A hung call kills the worker; the next call starts a fresh one."""

    def __init__(self, spec: str, kwargs: dict | None, timeout_s: float, key: str = "reward.function"):
        self.file, self.name = parse_spec(spec, key)
        self.kwargs, self.timeout_s, self.key = dict(kwargs or {}), float(timeout_s), key
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._start()  # a missing name or a file that fails to import fails here, at start-up

    def _start(self) -> None:
        from .contracts import accepted

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the ekipl package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ekipl.tasks.reward_worker", str(self.file), self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        send(self.proc.stdin, self.kwargs)
        status = self._wait(max(60.0, self.timeout_s))
        if status is None:
            self.close()
            raise RewardFunctionError(f"{self.key}: {self.file} did not load within 60 s")
        if status[0] != "ok":
            self.close()
            msg = status[1]
            if "accepted contracts" not in msg:
                msg += f" (accepted contracts: {accepted()})"
            raise RewardFunctionError(f"{self.key}: {msg}")
        self.contract = status[1]

    def _wait(self, timeout: float):
        """The worker's next frame, or None when none came within ``timeout`` (or it died)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        try:
            return receive(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError, struct.error):
            return None

    def call_many(self, completions: list, samples: list, lengths: list | None = None) -> list:
        """One ``("ok", result)`` or ``("error", why)`` per completion: the whole batch in one frame,
        scored as the function's contract says (a batched contract in one call). Raises, for the
        batch, on a time-out (``reward.timeout_s`` per completion), a dead worker or a batched call's
        error."""
        if self.proc is None or self.proc.poll() is not None:
            self.restarts += 1
            self._start()
        send(self.proc.stdin, (list(completions), list(samples), lengths))
        reply = self._wait(self.timeout_s * max(1, len(completions)))
        if reply is None:
            died = self.proc.poll() is not None
            self.close()
            if died:
                raise RuntimeError("the reward worker process died")
            raise TimeoutError(f"ran past reward.timeout_s={self.timeout_s:g}s")
        kind, value = reply
        if kind == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None


class Scorer:
    """Scores completions through one path: the user's ``reward.function`` when set, else the
    registry entry of the sample's task. Faults of a reward function score 0 and are counted."""

    def __init__(
        self,
        weights: RewardWeights | None = None,
        function: str = "",
        function_kwargs: dict | None = None,
        timeout_s: float = 10.0,
        key: str = "reward.function",
    ):
        self.weights = weights or RewardWeights()
        self.user = UserReward(function, function_kwargs, timeout_s, key) if function else None
        self.errors = 0
        self._logged: set[str] = set()

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names this scorer can score (None: any, a user function scores them all)."""
        return None if self.user is not None else tuple(REWARDS)

    def score_batch(
        self, completions: list, samples: list, evaluation: bool = False, lengths: list | None = None
    ) -> list[Reward]:
        """:meth:`score` for each (completion, sample), a user's function called once for the batch
        (its contract decides whether that is one call or one per completion). ``lengths``: the
        completions' token counts, for contracts that take them (EasyR1's ``response_length``)."""
        completions = ["" if c is None else c if isinstance(c, str) else str(c) for c in completions]
        if self.user is None or not completions:
            return [self.score(c, s, evaluation) for c, s in zip(completions, samples, strict=True)]
        name = f"{self.user.file.name}:{self.user.name}"
        try:
            replies = self.user.call_many(completions, samples, lengths)
        except Exception as e:  # noqa: BLE001 -- a time-out or dead worker: every completion scores 0
            replies = [("error", f"{type(e).__name__}: {e}")] * len(completions)
        out = []
        for c, s, (kind, value) in zip(completions, samples, replies, strict=True):
            try:
                if kind == "error":
                    raise RuntimeError(value)
                out.append(to_reward(value, c, self.weights.format_rule))
            except Exception as e:  # noqa: BLE001 -- a reward never stops a run
                self._fault(name, s, e)
                out.append(ZERO)
        return out

    def probe(self, sample: Sample) -> None:
        """One call of the user's function on a real sample (a well-formed answer to it), at
        start-up: a function that cannot be called that way raises :class:`RewardFunctionError`
        naming the key and the contracts accepted, before any step runs."""
        if self.user is None:
            return
        from .contracts import accepted

        answer = f"<think>probe</think><answer>{sample.answer}</answer>"
        try:
            ((kind, value),) = self.user.call_many([answer], [sample], [len(answer.split())])
            if kind == "error":
                raise RuntimeError(value)
            to_reward(value, answer, self.weights.format_rule)
        except Exception as e:  # noqa: BLE001 -- reported as the key's error
            raise RewardFunctionError(
                f"{self.user.key}: {self.user.file.name}:{self.user.name} was detected as the "
                f"{self.user.contract!r} contract, and one call on sample {sample.id!r} failed: "
                f"{type(e).__name__}: {e}. Accepted contracts: {accepted()}"
            ) from None

    def score(self, completion: str, sample: Sample, evaluation: bool = False) -> Reward:
        if self.user is not None:  # one path for a user's function: its worker, as a batch of one
            return self.score_batch([completion], [sample], evaluation)[0]
        if not isinstance(completion, str):
            completion = "" if completion is None else str(completion)
        if sample.task not in REWARDS:
            raise ValueError(f"no reward for task {sample.task!r}; known tasks: {sorted(REWARDS)}")
        entry = REWARDS[sample.task]
        fn, kwargs, name = entry.pick(evaluation), entry_kwargs(entry, self.weights), sample.task
        try:
            return to_reward(fn(completion, sample, **kwargs), completion, self.weights.format_rule)
        except Exception as e:  # noqa: BLE001 -- a reward never stops a run (RewardValueError too)
            self._fault(name, sample, e)
            return ZERO

    def _fault(self, name: str, sample: Sample, e: BaseException) -> None:
        self.errors += 1
        what = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}"
        if what not in self._logged:  # once per kind; reward/errors counts them all
            self._logged.add(what)
            log.warning(
                "reward %s failed on sample %r (%s); the action scores 0 (logged once per kind, "
                "counted in reward/errors)",
                name,
                sample.id,
                what,
            )

    def metrics(self) -> dict[str, float]:
        return {"reward/errors": float(self.errors)}

    def close(self) -> None:
        if self.user is not None:
            self.user.close()

    def __del__(self):  # a forgotten close must not leave a worker process behind
        try:
            self.close()
        except Exception:
            pass
