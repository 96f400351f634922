"""The typed sample that data loading, rollout and the learner share."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

TASKS = ("counting", "geometry", "trance")


class DataError(ValueError):
    """Bad input data. The message names the file, the row (index and id) and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        row_id: Any = None,
        field: str | None = None,
    ):
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}" + (f" (id={row_id!r})" if row_id is not None else ""))
        elif row_id is not None:
            where.append(f"id={row_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([", ".join(where), message]) if where else message)
        self.file, self.row, self.row_id, self.field = file, row, row_id, field

    @classmethod
    def of(cls, sample: Sample, message: str, field: str | None = None) -> DataError:
        """The error for one loaded sample: its file, row and id."""
        return cls(message, file=sample.source_file, row=sample.row, row_id=sample.id, field=field)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One problem: text, zero or more images (paths; decoded lazily), the ground truth, a CoT trace.

    ``answer`` is the ground truth in the task's own form: a count (``"3"``), a choice letter or a
    number/LaTeX expression for geometry, or a list of ``func(obj, value)`` steps for TRANCE.
    ``cot`` is a recorded full response (``<think>..</think><answer>..</answer>``), when present.
    """

    id: str
    task: str
    problem: str
    answer: str
    image_paths: tuple[str, ...] = ()
    cot: str | None = None
    source_file: str | None = None
    row: int | None = None
    meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def load_images(self) -> list:
        """Decode the images as RGB. A missing or corrupt file raises :class:`DataError`."""
        from PIL import Image, UnidentifiedImageError

        images = []
        for p in self.image_paths:
            try:
                with Image.open(p) as im:
                    im.load()
                    images.append(im.convert("RGB"))
            except FileNotFoundError:
                raise DataError(
                    f"image file not found: {p}",
                    file=self.source_file,
                    row=self.row,
                    row_id=self.id,
                    field="image",
                ) from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise DataError(
                    f"corrupt image {p}: {e}",
                    file=self.source_file,
                    row=self.row,
                    row_id=self.id,
                    field="image",
                ) from None
        return images

    def image_exists(self) -> list[str]:
        return [p for p in self.image_paths if not Path(p).is_file()]


def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes (an image's identity in cache keys; a checkpoint file's)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
