"""The example task's reward: ``reward.function=examples/own_task/reward.py:score``.

ekipl calls it once per completion, in a worker process, as ``score(completion, sample, **kwargs)``
(``kwargs``: ``reward.function_kwargs``). ``sample.answer`` is the ``label`` column,
``sample.meta["kind"]`` the row's ``kind``. It returns the total with its parts, which ekipl logs as
``reward/<source>/{mean,accuracy,format}``.
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def score(completion: str, sample, format_weight: float = 0.5) -> dict:
    found = ANSWER.findall(completion)
    answer = found[-1].strip().lower() if found else ""
    if sample.meta.get("kind") == "sum":  # numbers: "7", "7.0" and " 7 " all count
        try:
            correct = float(answer) == float(sample.answer)
        except ValueError:
            correct = False
    else:
        correct = answer == sample.answer.lower()
    fmt = 1.0 if completion.strip().startswith("<think>") and found else 0.0
    return {"accuracy": float(correct), "format": fmt, "total": float(correct) + format_weight * fmt}
