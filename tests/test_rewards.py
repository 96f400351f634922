"""Table-driven reward tests, with hand-written edge cases per task."""

from __future__ import annotations

import pytest

from ekipl.tasks import rewards as R
from ekipl.tasks.sample import Sample


def S(task, answer):
    return Sample(id="x", task=task, problem="q", answer=answer)


def A(ans, think="ok"):
    return f"<think>{think}</think><answer>{ans}</answer>"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>a</think><answer>3</answer>", 1.0),
        ("  <think>a\nb</think>\n <answer> 3 </answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>a</think>x<answer>3</answer>", 0.0),  # text between the blocks
        ("<think>a</think><answer>3</answer> trailing", 0.0),
        ("lead <think>a</think><answer>3</answer>", 0.0),
        ("<answer>3</answer><think>a</think>", 0.0),
        ("<think>a</think><think>b</think><answer>3</answer>", 0.0),  # repeated tag
        ("<think>a<answer>3</answer></think><answer>3</answer>", 0.0),
        ("<think>a</think><answer>3", 0.0),  # unbalanced
        ("<answer>3</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format(text, expected):
    assert R.format_reward(text) == expected
    assert R.format_reward(text, rule="strict") == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>a</think><answer>3</answer>", 1.0),
        ("<think>a\nb</think>\n <answer> 3 </answer>", 1.0),
        ("<think>a</think><think>b</think><answer>3</answer>", 1.0),  # repeated blocks: accepted
        ("<think>a<answer>3</answer></think><answer>3</answer>", 1.0),  # .*? spans the nested tags
        ("  <think>a</think><answer>3</answer>", 0.0),  # fullmatch on the raw text: no stripping
        ("<think>a</think><answer>3</answer>\n", 0.0),
        ("<think>a</think>x<answer>3</answer>", 0.0),
        ("<answer>3</answer>", 0.0),
    ],
)
def test_format_reason_rft_is_the_published_regex(text, expected):
    import re

    published = re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL)
    assert R.format_reward(text, rule="reason_rft") == expected == float(published is not None)
    weights = R.RewardWeights(format_rule="reason_rft")
    assert R.score(text, Sample(id="x", task="counting", problem="q", answer="3"), weights).format == expected


def test_format_rule_errors_and_bounded_time():
    import time

    with pytest.raises(ValueError, match="reward.format_rule: unknown 'loose'"):
        R.RewardWeights(format_rule="loose")
    # the lazy groups backtrack quadratically: a worst case at the length bound stays fast, beyond it
    # the completion scores 0 without a match
    worst = "<think>" + "</think>" * (R.MAX_FORMAT_CHARS // 8 - 2)
    t0 = time.perf_counter()
    assert R.format_reward(worst, rule="reason_rft") == 0.0
    assert R.format_reward(worst * 3 + "<answer>1</answer>", rule="reason_rft") == 0.0
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize(
    "completion,gt,expected",
    [
        (A("3"), "3", 1.0),
        (A(" 3 "), "3", 1.0),
        (A("3.0"), "3", 1.0),
        (A("+3"), "3", 1.0),
        (A("3."), "3", 1.0),
        (A("three"), "3", 1.0),
        (A("Three"), "3", 1.0),
        (A("0"), "0", 1.0),
        (A("zero"), "0", 1.0),
        (A("4"), "3", 0.0),
        (A("3.5"), "3", 0.0),
        (A("3 cubes"), "3", 0.0),  # must commit to one number
        (A("3 or 4"), "3", 0.0),
        (A("thirty"), "30", 0.0),  # number words stop at twenty
        (A("1e400"), "3", 0.0),
        (A("9" * 5000), "3", 0.0),
        ("<think>3</think>", "3", 0.0),  # no answer block
        (A("2") + A("3"), "3", 1.0),  # the last answer block counts
        ("no tags 3", "3", 0.0),
    ],
)
def test_counting_accuracy(completion, gt, expected):
    assert R.counting_accuracy(completion, S("counting", gt)) == expected


@pytest.mark.parametrize(
    "completion,gt,expected",
    [
        (A("B"), "B", 1.0),
        (A("(B)"), "B", 1.0),
        (A("b"), "B", 1.0),
        (A("B. 13.6"), "B", 1.0),
        (A("B: 13.6"), "B", 1.0),
        (A("C"), "B", 0.0),
        (A("Because"), "B", 0.0),  # a word starting with B is not a choice
        (A("13.6"), "13.6", 1.0),
        (A("13.61"), "13.6", 1.0),  # within the default 1% relative tolerance
        (A("14"), "13.6", 0.0),
        (A("12"), "12.0", 1.0),
        (A("1,200"), "1200", 1.0),
        (A("\\frac{1}{2}"), "0.5", 1.0),  # math-verify
        (A("\\sqrt{2}"), "\\sqrt{2}", 1.0),
        (A("2\\sqrt{3}"), "\\sqrt{12}", 1.0),
        (A("\\sqrt{3}"), "\\sqrt{12}", 0.0),
        (A("{" * 50 + "1" + "}" * 50), "1", 0.0),  # too deep for math-verify: 0, quickly
        (A("9^9^9^9^9"), "1", 0.0),
    ],
)
def test_geometry_accuracy(completion, gt, expected):
    assert R.geometry_accuracy(completion, S("geometry", gt)) == expected


def test_geometry_tolerance_is_configurable():
    s = S("geometry", "100")
    assert R.geometry_accuracy(A("104"), s, rel_tol=0.05) == 1.0
    assert R.geometry_accuracy(A("104"), s, rel_tol=0.01) == 0.0


GT2 = "change_color(1, red), change_size(0, large)"


@pytest.mark.parametrize(
    "pred,expected",
    [
        ("change_color(1, red), change_size(0, large)", 1.0),
        ("change_size(0, large); change_color(1, red)", 1.0),  # order-free
        ("change_color(1, red)", 0.5),
        ("change_color(1, red), change_size(0, small)", 0.5),
        ("change_color(1, red), change_size(0, large), change_shape(2, cube)", 2 / 3),
        ("change_color(1, red), change_color(1, red)", 0.5 * 0.5),  # repeat penalty
        ("nothing", 0.0),
    ],
)
def test_trance_training_reward(pred, expected):
    assert R.trance_accuracy(A(pred), S("trance", GT2)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "pred,expected",
    [
        ("change_color(1, red), change_size(0, large)", 1.0),
        ("change_color(1, blue), change_size(0, large)", (0.5 + 1.0) / 2),  # func+obj
        ("change_color(2, red), change_size(0, large)", (0.5 + 1.0) / 2),  # func+value
        ("change_color(2, blue), change_size(0, large)", (0.25 + 1.0) / 2),  # func only
        ("change_shape(1, red)", 0.0),
        ("change_color(1, red)", 0.5),
    ],
)
def test_trance_evaluation_partial_credit(pred, expected):
    assert R.trance_partial_credit(A(pred), S("trance", GT2)) == pytest.approx(expected)


def test_parse_steps():
    assert R.parse_steps("change_color( 1 , 'Red' )\nchange_position(0, front_left)") == [
        ("change_color", "1", "red"),
        ("change_position", "0", "front_left"),
    ]


def test_totals_use_weights_and_eval_table():
    s = S("counting", "3")
    assert R.score(A("3"), s) == R.Reward(1.0, 1.0, 2.0)
    assert R.score(A("3"), s, R.RewardWeights(accuracy=0.9, format=0.1)).total == pytest.approx(1.0)
    assert R.score("3", s) == R.Reward(0.0, 0.0, 0.0)
    t = S("trance", GT2)
    pred = A("change_color(1, blue), change_size(0, large)")
    assert R.score(pred, t).accuracy == 0.5
    assert R.score(pred, t, evaluation=True).accuracy == 0.75


def test_every_task_has_a_reward_and_unknown_task_is_an_error():
    from ekipl.tasks import TASKS

    assert set(R.ACCURACY) == set(TASKS) == set(R.EVAL_ACCURACY)
    with pytest.raises(ValueError, match="no reward for task 'chess'"):
        R.score(A("1"), S("chess", "1"))


def test_no_eval_of_model_output(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval called on model output")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    for task, gt in [("counting", "3"), ("geometry", "0.5"), ("trance", GT2)]:
        R.score(A("__import__('os').system('true')"), S(task, gt))
        R.score(A("1+2"), S(task, gt))


def test_math_verify_is_cut_at_its_time_limit_even_where_the_library_catches_exceptions(monkeypatch):
    """math-verify and sympy wrap their work in ``except Exception`` (an integral in an answer took
    1.4 s past the 0.5 s limit): the timer's exception must not be one they can swallow. A fault
    stand-in for verify that catches every Exception and would run for 5 s is cut at the limit."""
    import time

    parse, _ = R._math_verify()

    def stubborn_verify(*args, **kwargs):
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                time.sleep(0.01)
            except Exception:  # what the library does; a timer raising an Exception dies here
                pass
        return True

    monkeypatch.setattr(R, "_MV", (parse, stubborn_verify))
    monkeypatch.setattr(R, "MATH_VERIFY_SECONDS", 0.2)
    t0 = time.monotonic()
    assert R.math_equal("\\frac{1}{2}", "0.5") is False
    assert time.monotonic() - t0 < 2.0
