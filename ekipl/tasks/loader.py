"""Load Reason-RFT-CoT files, ekipl's synthetic ones, or any ``datasets`` source into :class:`Sample` rows.

Where rows come from (:func:`read_rows`):

* a ``.json`` (a list, or ``{"data": [...]}``) or ``.jsonl`` file;
* a ``.parquet`` file, or a directory written by ``Dataset.save_to_disk`` (``DIR@split`` picks a
  split of a saved ``DatasetDict``), read with ``datasets``;
* a hub id with a split, ``name@split`` (``datasets.load_dataset``; from the local HF cache when
  ``HF_HUB_OFFLINE=1``, as the tests run it).

Column names are configurable (:class:`Columns`: ``data.prompt_key``, ``answer_key``, ``image_key``,
``cot_key``), Reason-RFT's by default. An image is a path (relative to the image root), embedded
bytes (``{"bytes": ..., "path": ...}`` as parquet files on the hub hold them) or a decoded image;
embedded ones are written once, content-addressed, under the image directory. A row without an
image is a text-only problem. Columns the loader does not read go to :attr:`Sample.meta`, for
reward functions.

Two published row forms are accepted:

* **RL form**: ``{"id", "image", "problem", "answer" | "solution", "cot"?, "task"?}``. ``image`` is a
  path relative to the image root, or a list of them. A ``solution`` such as
  ``"<answer> 3 </answer>"`` is reduced to its answer.
* **CoT-SFT form** (ShareGPT): ``{"id"?, "image" | "images", "conversations" | "messages"}`` with a
  human/user turn (``<image>`` markers are dropped) and a gpt/assistant turn, which becomes both the
  ``cot`` and, through its ``<answer>`` block, the answer.

Rows are validated eagerly (fields, task, image files exist); images are decoded lazily by
:meth:`Sample.load_images`. A task is valid when a reward scores it (``tasks``: the built-in ones by
default, None for any, as with a user's reward function). A bad row raises :class:`DataError`
naming the file, row, id and field, or with ``skip_bad_rows=True`` is counted, logged and left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Collection
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
    overlong: int = 0  # rows dropped because their prompt cannot fit the model (data.overlong=drop)


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which columns hold the problem, the answer, the images and the recorded trace."""

    prompt: str = "problem"
    answer: str = "answer"
    image: str = "image"
    cot: str = "cot"


_READ = ("id", "task", "conversations", "messages", "solution", "images")  # read besides Columns'


class TaskDataset:
    """A ``datasets.Dataset`` of validated rows that yields :class:`Sample` objects."""

    def __init__(self, rows: list[dict], report: LoadReport):
        import datasets

        self.report = report
        self.rows = rows
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
            meta=json.loads(r["meta"]) if r.get("meta") else {},
        )

    def without(self, indices: Collection[int], overlong: bool = True) -> TaskDataset:
        """A copy without the rows at ``indices`` (counted as overlong prompts in the report)."""
        drop = set(indices)
        report = dataclasses.replace(self.report, skipped=list(self.report.skipped))
        report.overlong += len(drop) if overlong else 0
        kept = [r for i, r in enumerate(self.rows) if i not in drop]
        report.kept = len(kept)
        return TaskDataset(kept, report)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _hf_rows(ds, where: str) -> list:
    """A ``datasets.Dataset``'s rows as dicts, image columns undecoded (bytes and paths)."""
    import datasets

    features = dict(ds.features)
    for name, feat in features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feat, datasets.List | datasets.Sequence) and isinstance(
            getattr(feat, "feature", None), datasets.Image
        ):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    if len(ds) == 0:
        raise DataError("no rows", file=where)
    return list(ds)


def read_rows(source: str | Path) -> list:
    """The raw rows of a data source (see the module docstring): a JSON/JSONL file, a parquet
    file, a ``save_to_disk`` directory (``DIR@split``), or a hub id ``name@split``."""
    text = str(source)
    path = Path(text)
    if path.suffix in (".json", ".jsonl") or (path.is_file() and path.suffix != ".parquet"):
        return _read_json_rows(path)
    import datasets

    try:
        if path.suffix == ".parquet":
            if not path.is_file():
                raise DataError(f"data file not found: {path}")
            return _hf_rows(datasets.Dataset.from_parquet(str(path)), text)
        base, _, split = text.rpartition("@") if "@" in text else (text, "", "")
        if Path(base).is_dir():
            ds = datasets.load_from_disk(base)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"name a split as {base}@SPLIT; splits: {sorted(ds)}", file=base)
                ds = ds[split]
            return _hf_rows(ds, text)
        if not split or not base:
            raise DataError(f"data file not found: {text} (a hub dataset is named as NAME@SPLIT)")
        ds = datasets.load_dataset(base, split=split)
        return _hf_rows(ds, text)
    except DataError:
        raise
    except Exception as e:  # datasets' own errors: not cached offline, a bad split, a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DataError(f"cannot read it with datasets: {type(e).__name__}: {first}", file=text) from None


def _read_json_rows(path: Path) -> list:
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


def _image_dir() -> Path:
    return Path(os.environ.get("EKIPL_CACHE", Path.home() / ".cache" / "ekipl")) / "images"


def _embedded(image, image_dir: Path) -> str | None:
    """The path of an embedded image (bytes or a decoded image), written once under ``image_dir``
    by its content's hash; None when ``image`` is not an embedded image."""
    blob = None
    if isinstance(image, dict) and image.get("bytes"):
        blob = bytes(image["bytes"])
    elif hasattr(image, "save") and hasattr(image, "size"):  # a decoded PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        blob = buf.getvalue()
    if blob is None:
        return None
    out = image_dir / f"{hashlib.sha256(blob).hexdigest()[:24]}.img"
    if not out.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, out)
    return str(out)


def _image_paths(images, image_root: Path, image_dir: Path, err) -> list[str]:
    """A row's images (None, one or a list of paths, embedded bytes or decoded images) as paths."""
    if images is None:
        return []
    if not isinstance(images, list | tuple):
        images = [images]
    paths = []
    for im in images:
        if isinstance(im, dict) and not im.get("bytes"):
            im = im.get("path")
        if isinstance(im, str) and im:
            paths.append(str(Path(im) if Path(im).is_absolute() else image_root / im))
            continue
        path = _embedded(im, image_dir)
        if path is None:
            raise err("must be a path, embedded image bytes or a list of them", "image")
        paths.append(path)
    return paths


def _json_safe(value):
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def _normalise(
    raw,
    *,
    path: str,
    index: int,
    image_root: Path,
    task: str | None,
    check_images: bool,
    columns: Columns = Columns(),
    tasks: Collection[str] | None = TASKS,
    image_dir: Path | None = None,
) -> dict:
    def err(msg, field=None):
        rid = raw.get("id") if isinstance(raw, dict) else None
        return DataError(msg, file=str(path), row=index, row_id=rid, field=field)

    if not isinstance(raw, dict):
        raise err(f"a row must be a JSON object, got {type(raw).__name__}")
    rid = raw.get("id", index)
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise err("must be a string or an integer", "id")

    row_task = raw.get("task") or task
    if row_task is None:
        raise err("missing, and no task was given to the loader (data.task)", "task")
    if not isinstance(row_task, str):
        raise err("must be a string", "task")
    if tasks is not None and row_task not in tasks:
        raise err(
            f"unknown task {row_task!r}; known tasks: {', '.join(sorted(tasks))} "
            "(reward.function=FILE.py:NAME scores tasks of your own)",
            "task",
        )

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
        answer = raw.get(columns.answer, extract_answer(cot))
        if answer is None:
            raise err(
                "the assistant turn has no <answer>...</answer> and the row has no answer", "conversations"
            )
    else:  # RL form
        problem = raw.get(columns.prompt)
        if not isinstance(problem, str) or not problem.strip():
            raise err("missing or empty", columns.prompt)
        if columns.answer in raw:
            answer, field = raw[columns.answer], columns.answer
        elif "solution" in raw:
            answer, field = raw["solution"], "solution"
            if isinstance(answer, str) and "<answer>" in answer:
                answer = extract_answer(answer)
        else:
            raise err(f"missing: a row needs {columns.answer!r} or 'solution'", columns.answer)
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise err("must be a string or a number", field)
        cot = raw.get(columns.cot)
        if cot is not None and not isinstance(cot, str):
            raise err("must be a string when present", columns.cot)
    answer = str(answer).strip()
    if not answer:
        raise err("empty answer", columns.answer)

    image_key = columns.image if columns.image in raw or columns.image != "image" else "images"
    paths = _image_paths(raw.get(image_key), image_root, image_dir or _image_dir(), err)
    if check_images:
        for p in paths:
            if not Path(p).is_file():
                raise err(f"image file not found: {p}", "image")
    used = {columns.prompt, columns.answer, columns.image, columns.cot, *_READ}
    meta = {k: _json_safe(v) for k, v in raw.items() if k not in used}
    return {
        "id": str(rid),
        "task": row_task,
        "problem": problem,
        "answer": answer,
        "image_paths": paths,
        "cot": cot,
        "source_file": str(path),
        "row": index,
        "meta": json.dumps(meta) if meta else "",
    }


def load_task_file(
    path: str | Path,
    image_root: str | Path | None = None,
    task: str | None = None,
    skip_bad_rows: bool = False,
    check_images: bool = True,
    columns: Columns = Columns(),
    tasks: Collection[str] | None = TASKS,
    image_dir: str | Path | None = None,
) -> TaskDataset:
    """Load one data source (a file, a ``save_to_disk`` directory or ``name@split``; see the module
    docstring). ``image_root`` defaults to the file's directory; ``tasks``: the task names a reward
    scores (None: any); ``image_dir``: where embedded images are written ($EKIPL_CACHE/images)."""
    where = str(path)
    local = Path(where.rpartition("@")[0] if "@" in where and not Path(where).exists() else where)
    image_root = Path(image_root) if image_root is not None else (local if local.is_dir() else local.parent)
    if task is not None and tasks is not None and task not in tasks:
        raise DataError(
            f"unknown task {task!r}; known tasks: {', '.join(sorted(tasks))} "
            "(reward.function=FILE.py:NAME scores tasks of your own)",
            file=where,
            field="task",
        )
    raw_rows = read_rows(path)
    report = LoadReport(file=where, total=len(raw_rows))
    rows, seen = [], set()
    image_dir = Path(image_dir) if image_dir is not None else None
    for i, raw in enumerate(raw_rows):
        try:
            row = _normalise(
                raw,
                path=where,
                index=i,
                image_root=image_root,
                task=task,
                check_images=check_images,
                columns=columns,
                tasks=tasks,
                image_dir=image_dir,
            )
            if row["id"] in seen:
                raise DataError("duplicate id", file=where, row=i, row_id=row["id"], field="id")
            seen.add(row["id"])
            rows.append(row)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skipped.append(str(e))
            log.warning("skipping bad row: %s", e)
    report.kept = len(rows)
    if report.skipped:
        log.warning("%s: skipped %d of %d rows (skip_bad_rows)", where, len(report.skipped), report.total)
    if not rows:
        raise DataError(f"no usable rows ({len(report.skipped)} skipped of {report.total})", file=where)
    return TaskDataset(rows, report)
