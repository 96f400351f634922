"""Rule-based rewards: pure functions ``(completion, sample) -> float`` in a registry keyed by task.

Every candidate in an EKIPL group -- the policy's and the auxiliary models' alike -- is scored by the
same rules:

    total = w_acc * accuracy + w_fmt * format

Guarantees: a reward never raises and never hangs. Inputs are bounded before any parsing (the
answer is cut to ``MAX_ANSWER_CHARS``), numbers are parsed without ``eval``, and math-verify runs
only on short, shallow expressions under a sub-second timer. Any internal error scores 0.0.

Decisions (documented here because the paper leaves them open):

* **Format** has two rules (``reward.format_rule``, ``FORMAT_RULES``):

  - ``strict`` (the default): 1.0 iff the stripped completion is exactly
    ``<think>X</think> <answer>Y</answer>`` (only whitespace between the blocks, each tag exactly
    once, nothing after ``</answer>``), checked in linear time. It is the published regex without
    its ambiguity about repeated tags: ``<think>a</think><think>b</think><answer>c</answer>`` and
    nested tags score 0, so a policy cannot be paid for stuttering blocks.
  - ``reason_rft``: the published rule of Reason-RFT (and R1-V, which it builds on), exactly:
    ``re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", completion, re.DOTALL)`` on the
    completion as it is (no stripping). It accepts repeated ``<think>`` blocks. The paper presets use
    it, so their format rewards match the published runs'. Its lazy groups backtrack in quadratic
    time at worst, so completions over ``MAX_FORMAT_CHARS`` score 0 (no 2,048-token answer is that
    long).
* **The answer** is the text inside the *last* ``<answer>...</answer>`` pair. Without one, accuracy
  is 0.
* **Counting**: the answer must be one number (``3``, ``3.0``, ``+3``, ``3.``) or an English number
  word from zero to twenty (``three``, case-insensitive), optionally with a trailing period. ``3
  cubes`` or ``3 or 4`` score 0: counting answers must commit to one number.
* **Geometry**: choice letters match on the first letter token (``B``, ``(B)``, ``B.``, ``B: 5``);
  numbers match within a relative tolerance (default 1e-2) or absolute 1e-6; anything else goes to
  math-verify (LaTeX, fractions, radicals) with a time limit.
* **TRANCE** answers are ``func(obj, value)`` steps separated by commas, semicolons or newlines.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable

from .sample import Sample

MAX_ANSWER_CHARS = 2000
MATH_VERIFY_MAX_CHARS = 200
MATH_VERIFY_MAX_DEPTH = 8
MATH_VERIFY_SECONDS = 0.5

RewardFn = Callable[[str, Sample], float]
ACCURACY: dict[str, RewardFn] = {}


def register(task: str):
    def deco(fn: RewardFn) -> RewardFn:
        ACCURACY[task] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# Format and answer extraction


MAX_FORMAT_CHARS = 16_000
_REASON_RFT_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
FORMAT_RULES = ("strict", "reason_rft")


def format_reward(completion: str, sample: Sample | None = None, rule: str = "strict") -> float:
    """1.0 iff the completion has the ``<think>..</think>\\s*<answer>..</answer>`` form under ``rule``
    (see the module docstring); 0.0 otherwise."""
    if rule == "reason_rft":
        ok = len(completion) <= MAX_FORMAT_CHARS and _REASON_RFT_FORMAT.fullmatch(completion) is not None
        return 1.0 if ok else 0.0
    if rule != "strict":
        raise ValueError(f"unknown format rule {rule!r}; known: {FORMAT_RULES}")
    try:
        s = completion.strip()
        if not (s.startswith("<think>") and s.endswith("</answer>")):
            return 0.0
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            if s.count(tag) != 1:
                return 0.0
        end_think = s.index("</think>")
        start_answer = s.index("<answer>")
        if start_answer < end_think or s[end_think + len("</think>") : start_answer].strip():
            return 0.0
        return 1.0
    except Exception:
        return 0.0


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, stripped and cut to MAX_ANSWER_CHARS."""
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return completion[start + len("<answer>") : end].strip()[:MAX_ANSWER_CHARS]


# --------------------------------------------------------------------------------------------------
# Numbers

_NUMBER = re.compile(r"[+-]?(?:\d{1,30}(?:\.\d{0,30})?|\.\d{1,30})(?:[eE][+-]?\d{1,3})?")
_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
NUMBER_WORDS = {w: float(i) for i, w in enumerate(_WORDS)}


def parse_number(text: str) -> float | None:
    """A single number (digits, optional sign/decimals/exponent) or a number word; else None."""
    t = text.strip().rstrip(".").strip() if len(text) <= 64 else ""
    if not t:
        return None
    if t.lower() in NUMBER_WORDS:
        return NUMBER_WORDS[t.lower()]
    t = t.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", t) else t
    if _NUMBER.fullmatch(t):
        value = float(t)
        return value if math.isfinite(value) else None
    return None


def numbers_close(a: float, b: float, rel_tol: float = 1e-2, abs_tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


# --------------------------------------------------------------------------------------------------
# Task rewards


@register("counting")
def counting_accuracy(completion: str, sample: Sample) -> float:
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    pred, gt = parse_number(ans), parse_number(sample.answer)
    return 1.0 if pred is not None and gt is not None and abs(pred - gt) < 1e-9 else 0.0


_CHOICE = re.compile(r"^\(?\s*([A-Ea-e])\s*\)?(?:$|[\s.:,)])")


def parse_choice(text: str) -> str | None:
    m = _CHOICE.match(text.strip())
    return m.group(1).upper() if m else None


@register("geometry")
def geometry_accuracy(completion: str, sample: Sample, rel_tol: float = 1e-2) -> float:
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    gt = sample.answer.strip()
    if len(gt) == 1 and gt.upper() in "ABCDE":
        return 1.0 if parse_choice(ans) == gt.upper() else 0.0
    pred_n, gt_n = parse_number(ans), parse_number(gt)
    if pred_n is not None and gt_n is not None:
        return 1.0 if numbers_close(pred_n, gt_n, rel_tol) else 0.0
    return 1.0 if math_equal(ans, gt) else 0.0


def _nesting_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch in "({[":
            depth += 1
            best = max(best, depth)
        elif ch in ")}]":
            depth = max(0, depth - 1)
    return best


class _Timeout(BaseException):  # not Exception: math-verify and sympy catch those and go on
    pass


def _run_with_time_limit(fn, seconds: float):
    """Run ``fn`` with a SIGALRM timer in the main thread; elsewhere rely on the input bounds."""
    if threading.current_thread() is not threading.main_thread():
        return fn()

    def on_alarm(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_MV = None


def _math_verify():
    """Import and warm math-verify once, outside any timer (its first parse builds grammars)."""
    global _MV
    if _MV is None:
        import logging

        from math_verify import parse, verify

        for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
            logging.getLogger(name).setLevel(
                logging.ERROR
            )  # it warns on every call run without its own timer
        verify(parse("$1$", parsing_timeout=None), parse("$1$", parsing_timeout=None), timeout_seconds=None)
        _MV = (parse, verify)
    return _MV


def math_equal(pred: str, gold: str) -> bool:
    """math-verify on bounded input, under MATH_VERIFY_SECONDS; False on any failure or timeout."""
    for text in (pred, gold):
        if len(text) > MATH_VERIFY_MAX_CHARS or _nesting_depth(text) > MATH_VERIFY_MAX_DEPTH:
            return False
        if text.count("^") > 3 or "\x00" in text:
            return False
        if re.search(r"\d{16,}", text):
            return False

    parse, verify = _math_verify()

    def check():
        def wrap(s):
            return s if "$" in s else f"${s}$"

        g = parse(wrap(gold), parsing_timeout=None)
        p = parse(wrap(pred), parsing_timeout=None)
        return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)

    try:
        return bool(_run_with_time_limit(check, MATH_VERIFY_SECONDS))
    except (_Timeout, Exception):
        return False


# TRANCE ------------------------------------------------------------------------------------------

_STEP = re.compile(r"([a-z_]{1,32})\s*\(\s*([^,()]{1,32}?)\s*,\s*([^,()]{1,32}?)\s*\)")
MAX_STEPS = 32


def parse_steps(text: str) -> list[tuple[str, str, str]]:
    """``change_color(1, red), change_size(0, large)`` -> [(func, obj, value), ...] (lower-cased)."""
    return [
        (f.lower(), o.strip().lower(), v.strip().strip("'\"").lower())
        for f, o, v in _STEP.findall(text[:MAX_ANSWER_CHARS])
    ][:MAX_STEPS]


def _steps_pair(completion: str, sample: Sample):
    """(predicted steps, ground-truth steps), or None when either side has no steps."""
    ans = extract_answer(completion)
    if ans is None:
        return None
    pred, gt = parse_steps(ans), parse_steps(sample.answer)
    return (pred, gt) if pred and gt else None


@register("trance")
def trance_accuracy(completion: str, sample: Sample) -> float:
    """Training reward: exact-step matches x repeat penalty / max(len(pred), len(gt)).

    Matches are counted as a multiset intersection (order-free; TRANCE steps commute when they touch
    different attributes). The repeat penalty is ``unique(pred) / len(pred)``, so listing a correct
    step many times does not pay.
    """
    pair = _steps_pair(completion, sample)
    if pair is None:
        return 0.0
    pred, gt = pair
    matches = sum((Counter(pred) & Counter(gt)).values())
    penalty = len(set(pred)) / len(pred)
    return matches * penalty / max(len(pred), len(gt))


def trance_partial_credit(completion: str, sample: Sample) -> float:
    """Evaluation score with partial credit per ground-truth step, greedily matched one to one.

    1.0 for an exact step, 0.5 for func+obj or func+value, 0.25 for func only; summed and divided by
    max(len(pred), len(gt)).
    """
    pair = _steps_pair(completion, sample)
    if pair is None:
        return 0.0
    pred, gt = pair

    def credit(p, g):
        if p == g:
            return 1.0
        if p[0] != g[0]:
            return 0.0
        return 0.5 if (p[1] == g[1] or p[2] == g[2]) else 0.25

    pairs = sorted(((credit(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)), reverse=True)
    used_p, used_g, total = set(), set(), 0.0
    for c, i, j in pairs:
        if c > 0 and i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            total += c
    return total / max(len(pred), len(gt))


EVAL_ACCURACY: dict[str, RewardFn] = {**ACCURACY, "trance": trance_partial_credit}


# --------------------------------------------------------------------------------------------------
# Totals, and the registry of reward functions


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """How a completion is scored: the weights of accuracy and format, and the format rule."""

    accuracy: float = 1.0
    format: float = 1.0
    format_rule: str = "strict"

    def __post_init__(self):
        if self.format_rule not in FORMAT_RULES:
            raise ValueError(f"reward.format_rule: unknown {self.format_rule!r}; known: {FORMAT_RULES}")


@dataclasses.dataclass(frozen=True)
class Reward:
    accuracy: float
    format: float
    total: float


ZERO = Reward(0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    """One reward function of the registry (see :mod:`ekipl.tasks.scorer` for the signature).

    ``evaluation``: the function that scores held-out splits when it differs from the training one
    (TRANCE: partial credit per step). ``weighted``: the function takes the run's weights as
    keyword arguments (``accuracy``, ``format``, ``format_rule``), as the built-in ones do."""

    fn: Callable[..., object]
    evaluation: Callable[..., object] | None = None
    weighted: bool = False

    def pick(self, evaluation: bool) -> Callable[..., object]:
        return self.evaluation if evaluation and self.evaluation is not None else self.fn


def _task_reward(accuracy_fn: RewardFn) -> Callable[..., dict]:
    """A built-in task's reward function: its accuracy rule (any internal error scores 0, as the
    module docstring promises) and the format rule, weighted into the total."""

    def reward(completion, sample, accuracy=1.0, format=1.0, format_rule="strict"):
        try:
            acc = float(accuracy_fn(completion, sample))
        except Exception:
            acc = 0.0
        acc = acc if math.isfinite(acc) else 0.0
        fmt = format_reward(completion, rule=format_rule)
        return {"accuracy": acc, "format": fmt, "total": accuracy * acc + format * fmt}

    reward.__name__ = reward.__qualname__ = f"{accuracy_fn.__name__}_reward"
    return reward


# Task name -> reward function. A sample is scored by the entry named by its task; a user's reward
# file (``reward.function``) takes the same path through :class:`ekipl.tasks.scorer.Scorer`.
REWARDS: dict[str, RewardEntry] = {
    task: RewardEntry(
        _task_reward(ACCURACY[task]),
        evaluation=_task_reward(EVAL_ACCURACY[task]) if EVAL_ACCURACY[task] is not ACCURACY[task] else None,
        weighted=True,
    )
    for task in ACCURACY
}


class RewardValueError(ValueError):
    """A reward function returned something that is not a reward."""


def to_reward(result, completion: str, format_rule: str = "strict") -> Reward:
    """A reward function's result as a :class:`Reward`.

    A number is the total, and also the accuracy (what ``ekipl.eval`` counts as solved at 1.0). A
    dict needs ``total``; a missing ``accuracy`` is the total, and a missing ``format`` is the format
    rule's check of the completion (logged, never added to the total). Non-numbers and non-finite
    values raise :class:`RewardValueError`."""

    def number(v, key):
        if isinstance(v, bool) or not isinstance(v, int | float):
            if not (hasattr(v, "item") and callable(v.item)):  # numpy and torch scalars
                raise RewardValueError(f"{key} must be a number, got {type(v).__name__}")
            v = v.item()
        v = float(v)
        if not math.isfinite(v):
            raise RewardValueError(f"{key} is not finite ({v})")
        return v

    if isinstance(result, dict):
        if "total" not in result:
            raise RewardValueError(f"a dict result needs a 'total' key, got keys {sorted(map(str, result))}")
        total = number(result["total"], "total")
        acc = number(result["accuracy"], "accuracy") if "accuracy" in result else total
        fmt = (
            number(result["format"], "format")
            if "format" in result
            else format_reward(completion, rule=format_rule)
        )
        return Reward(accuracy=acc, format=fmt, total=total)
    total = number(result, "the result")
    return Reward(accuracy=total, format=format_reward(completion, rule=format_rule), total=total)


def entry_kwargs(entry: RewardEntry, weights: RewardWeights, extra: dict | None = None) -> dict:
    """The keyword arguments a registry entry is called with."""
    if entry.weighted:
        return {"accuracy": weights.accuracy, "format": weights.format, "format_rule": weights.format_rule}
    return dict(extra or {})


def score(
    completion: str, sample: Sample, weights: RewardWeights = RewardWeights(), evaluation: bool = False
) -> Reward:
    """Accuracy, format and their weighted total under the built-in reward of ``sample.task``.
    Never raises for any completion string (:class:`~ekipl.tasks.scorer.Scorer` is the same path
    with user reward functions, time limits and error counts)."""
    if sample.task not in REWARDS:
        raise ValueError(f"no reward for task {sample.task!r}; known tasks: {sorted(REWARDS)}")
    if not isinstance(completion, str):
        completion = "" if completion is None else str(completion)
    entry = REWARDS[sample.task]
    return to_reward(
        entry.pick(evaluation)(completion, sample, **entry_kwargs(entry, weights)),
        completion,
        weights.format_rule,
    )
