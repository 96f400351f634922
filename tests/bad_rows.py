"""The malformed-row classes of the Tasks issue, shared by the loader's tests (tests/test_data.py)
and the entry point's (tests/reliability/test_bad_input.py)."""

from __future__ import annotations


def malformed_rows(good: dict) -> list[tuple[dict, str, str]]:
    """(row, the field the error must name, words the message must hold), each a broken ``good``."""
    return [
        ({**good, "image": "images/nope.png"}, "image", "image file not found"),
        ({k: v for k, v in good.items() if k != "problem"}, "problem", "missing or empty"),
        ({k: v for k, v in good.items() if k != "answer"}, "answer", "needs 'answer' or 'solution'"),
        ({**good, "answer": ["3"]}, "answer", "must be a string or a number"),
        ({**good, "task": "chess"}, "task", "unknown task 'chess'"),
        ({**good, "image": 5}, "image", "must be a path, embedded image bytes or a list of them"),
        ({**good, "conversations": [{"from": "human", "value": "q"}]}, "conversations", "at least two"),
        ({**good, "cot": 7}, "cot", "must be a string"),
    ]
