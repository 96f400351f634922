"""Fuzz: >= 1,000 random and pathological completions never raise and each scores in under 1 s."""

from __future__ import annotations

import random
import time

from ekipl.tasks import rewards as R
from ekipl.tasks.sample import Sample

SAMPLES = [
    Sample(id="c", task="counting", problem="q", answer="3"),
    Sample(id="g1", task="geometry", problem="q", answer="B"),
    Sample(id="g2", task="geometry", problem="q", answer="13.6"),
    Sample(id="g3", task="geometry", problem="q", answer="\\frac{\\sqrt{3}}{2}"),
    Sample(id="t", task="trance", problem="q", answer="change_color(1, red), change_size(0, large)"),
]

PATHOLOGICAL = [
    "x" * 100_000,
    "<think>" * 20_000,
    "<think>a</think><answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "<answer>" + "\\frac{" * 2000 + "1" + "}" * 2000 + "</answer>",
    "<answer>" + "{" * 50 + "}" * 50 + "</answer>",
    "<answer>" + "9" * 100_000 + "</answer>",
    "<answer>1e99999</answer>",
    "<answer>" + "9^" * 50 + "9</answer>",
    "<answer>10**10**10</answer>",
    "<think>a</think><answer>1\x00\x00</answer>",
    "\x00" * 10_000,
    "</answer><answer>" * 10_000,
    "<think></think><answer>" + "change_color(1, red), " * 10_000 + "</answer>",
    "<answer>" + "change_color(" * 10_000 + "</answer>",
    "<think>" + "</think><answer>" * 5000 + "3</answer>",
    "<answer>\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{\\sqrt{2}}}}}}</answer>",
    "<answer>\\int_0^\\infty e^{-x^2} dx</answer>",
    "<answer>" + "a" * 199 + "</answer>",
    "<answer>\ud800</answer>",
    "<answer>" + "1/" * 90 + "1</answer>",
]

ALPHABET = list("0123456789.,+-eE()[]{}^_\\ \n\t<>/abcxyzABCD") + [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "\\frac",
    "\\sqrt",
    "change_color",
    "(1, red)",
    "three",
    "\x00",
]


def _random_completion(rng: random.Random) -> str:
    n = rng.choice([0, 1, 5, 20, 100, 1000])
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def test_fuzz_rewards_never_raise_and_stay_fast():
    R._math_verify()  # its one-time import and warm-up (over 1 s on a 2 GHz host) is outside any timer
    rng = random.Random(1234)
    completions = PATHOLOGICAL + [_random_completion(rng) for _ in range(1000)]
    for c in completions:
        for s in SAMPLES:
            for evaluation in (False, True):
                t0 = time.perf_counter()
                r = R.score(c, s, evaluation=evaluation)
                dt = time.perf_counter() - t0
                assert dt < 1.0, f"{s.task} took {dt:.2f}s on {c[:80]!r}"
                assert 0.0 <= r.accuracy <= 1.0 and r.format in (0.0, 1.0), (c[:80], r)
    assert len(completions) >= 1000
