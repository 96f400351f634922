"""Load Reason-RFT-CoT files (or ekipl's synthetic ones) into :class:`Sample` rows.

Two published forms are accepted, in ``.json`` (a list, or ``{"data": [...]}``) or ``.jsonl``:

* **RL form**: ``{"id", "image", "problem", "answer" | "solution", "cot"?, "task"?}``. ``image`` is a
  path relative to the image root, or a list of them. A ``solution`` such as
  ``"<answer> 3 </answer>"`` is reduced to its answer.
* **CoT-SFT form** (ShareGPT): ``{"id"?, "image" | "images", "conversations" | "messages"}`` with a
  human/user turn (``<image>`` markers are dropped) and a gpt/assistant turn, which becomes both the
  ``cot`` and, through its ``<answer>`` block, the answer.

Rows are validated eagerly (fields, task, image files exist); images are decoded lazily by
:meth:`Sample.load_images`. A bad row raises :class:`DataError` naming the file, row, id and field,
or with ``skip_bad_rows=True`` is counted, logged and left out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from .rewards import extract_answer
from .sample import TASKS, DataError, Sample

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadReport:
    file: str
    total: int = 0
    kept: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)


class TaskDataset:
    """A ``datasets.Dataset`` of validated rows that yields :class:`Sample` objects."""

    def __init__(self, rows: list[dict], report: LoadReport):
        import datasets

        self.report = report
        self.hf = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, i: int) -> Sample:
        r = self.hf[int(i)]
        return Sample(
            id=r["id"],
            task=r["task"],
            problem=r["problem"],
            answer=r["answer"],
            image_paths=tuple(r["image_paths"]),
            cot=r["cot"],
            source_file=r["source_file"],
            row=r["row"],
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _read_rows(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", file=str(path)) from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON on line {n}: {e.msg}", file=str(path), row=len(rows)) from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", file=str(path)
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError('expected a JSON list of rows (or {"data": [...]})', file=str(path))
    return data


def _turns(row: dict) -> list[dict] | None:
    for key in ("conversations", "messages"):
        if key in row:
            return row[key]
    return None


def _normalise(
    raw, *, path: Path, index: int, image_root: Path, task: str | None, check_images: bool
) -> dict:
    def err(msg, field=None):
        rid = raw.get("id") if isinstance(raw, dict) else None
        return DataError(msg, file=str(path), row=index, row_id=rid, field=field)

    if not isinstance(raw, dict):
        raise err(f"a row must be a JSON object, got {type(raw).__name__}")
    rid = raw.get("id", index)
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise err("must be a string or an integer", "id")

    row_task = raw.get("task", task)
    if row_task is None:
        raise err("missing, and no task was given to the loader", "task")
    if row_task not in TASKS:
        raise err(f"unknown task {row_task!r}; known tasks: {', '.join(TASKS)}", "task")

    turns = _turns(raw)
    if turns is not None:  # CoT-SFT (ShareGPT) form
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns):
            raise err("must be a list of at least two {from/role, value/content} turns", "conversations")
        user = [t for t in turns if t.get("from", t.get("role")) in ("human", "user")]
        bot = [t for t in turns if t.get("from", t.get("role")) in ("gpt", "assistant")]
        if not user or not bot:
            raise err("needs a human/user turn and a gpt/assistant turn", "conversations")
        problem = user[0].get("value", user[0].get("content"))
        cot = bot[-1].get("value", bot[-1].get("content"))
        if not isinstance(problem, str) or not isinstance(cot, str):
            raise err("turn text must be a string", "conversations")
        problem = problem.replace("<image>", "").strip()
        answer = raw.get("answer", extract_answer(cot))
        if answer is None:
            raise err(
                "the assistant turn has no <answer>...</answer> and the row has no answer", "conversations"
            )
    else:  # RL form
        problem = raw.get("problem")
        if not isinstance(problem, str) or not problem.strip():
            raise err("missing or empty", "problem")
        if "answer" in raw:
            answer, field = raw["answer"], "answer"
        elif "solution" in raw:
            answer, field = raw["solution"], "solution"
            if isinstance(answer, str) and "<answer>" in answer:
                answer = extract_answer(answer)
        else:
            raise err("missing: a row needs 'answer' or 'solution'", "answer")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise err("must be a string or a number", field)
        cot = raw.get("cot")
        if cot is not None and not isinstance(cot, str):
            raise err("must be a string when present", "cot")
    answer = str(answer).strip()
    if not answer:
        raise err("empty answer", "answer")

    images = raw.get("image", raw.get("images", []))
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise err("must be a path or a list of paths", "image")
    paths = [str(Path(p) if Path(p).is_absolute() else image_root / p) for p in images]
    if check_images:
        for p in paths:
            if not Path(p).is_file():
                raise err(f"image file not found: {p}", "image")
    return {
        "id": str(rid),
        "task": row_task,
        "problem": problem,
        "answer": answer,
        "image_paths": paths,
        "cot": cot,
        "source_file": str(path),
        "row": index,
    }


def load_task_file(
    path: str | Path,
    image_root: str | Path | None = None,
    task: str | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
) -> TaskDataset:
    """Load one data file. ``image_root`` defaults to the file's directory."""
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    if task is not None and task not in TASKS:
        raise DataError(
            f"unknown task {task!r}; known tasks: {', '.join(TASKS)}", file=str(path), field="task"
        )
    raw_rows = _read_rows(path)
    report = LoadReport(file=str(path), total=len(raw_rows))
    rows, seen = [], set()
    for i, raw in enumerate(raw_rows):
        try:
            row = _normalise(
                raw, path=path, index=i, image_root=image_root, task=task, check_images=check_images
            )
            if row["id"] in seen:
                raise DataError("duplicate id", file=str(path), row=i, row_id=row["id"], field="id")
            seen.add(row["id"])
            rows.append(row)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skipped.append(str(e))
            log.warning("skipping bad row: %s", e)
    report.kept = len(rows)
    if report.skipped:
        log.warning("%s: skipped %d of %d rows (skip_bad_rows)", path, len(report.skipped), report.total)
    if not rows:
        raise DataError(f"no usable rows ({len(report.skipped)} skipped of {report.total})", file=str(path))
    return TaskDataset(rows, report)
