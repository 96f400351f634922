"""A run's data on the driver: the training rows (a file, a dataset or the synthetic set) and the
held-out splits under the run's data settings, prompts too long for the model dropped or refused,
the deterministic sampler whose position is part of the run's state, and the image check."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from ekipl.config import RunConfig
from ekipl.tasks.sample import TASKS, DataError

log = logging.getLogger("ekipl.train")


def load_split(run: RunConfig, source: str, out: Path, tasks=TASKS, skip_bad_rows: bool | None = None):
    """One data source under the run's data settings (columns, image root, task, bad rows)."""
    from ekipl.tasks.loader import load_task_file

    d = run.data
    return load_task_file(
        source,
        image_root=d.image_root,
        task=d.task,
        skip_bad_rows=d.skip_bad_rows if skip_bad_rows is None else skip_bad_rows,
        columns=d.columns(),
        tasks=tasks,
        image_dir=out / "data" / "images",
    )


def load_data(run: RunConfig, out: Path, tasks=TASKS):
    """The training rows: ``data.train_file`` or the synthetic set written under ``out``. ``tasks``:
    the task names the run's reward scores (None: any)."""
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.synth import make_dataset

    d = run.data
    if d.train_file:
        return load_split(run, d.train_file, out, tasks)
    paths = make_dataset(
        d.synthetic_task,
        out / "data",
        n_train=d.synthetic_size,
        n_test=max(4, d.synthetic_size // 4),
        seed=run.trainer.seed if d.synthetic_seed is None else d.synthetic_seed,
    )
    return load_task_file(paths["train"], skip_bad_rows=d.skip_bad_rows)


def prompt_length(processor, text: str, image_paths) -> int | None:
    """Tokens of a rendered prompt with its images expanded as the processor expands them (None
    when an image cannot be read: the image check reports it)."""
    from PIL import Image

    tok = getattr(processor, "tokenizer", processor)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    if not image_paths:
        return n
    try:
        sizes = []
        for p in image_paths:
            with Image.open(p) as im:  # the header only: no decoding
                sizes.append((im.height, im.width))
    except Exception:  # noqa: BLE001 -- a missing or corrupt image is ImageCheck's to report
        return None
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    return n + sum(c - 1 for c in counts)  # each image's one placeholder becomes c tokens


def drop_overlong(ds, processor, run: RunConfig, name: str):
    """``ds`` without the rows whose prompt leaves no room for one completion token within
    ``model.max_model_len`` (counted in ``ds.report.overlong``), or DataError naming the first one
    under ``data.overlong=error``."""
    from ekipl.tasks.prompts import render_prompt

    limit = run.model.max_model_len - 1
    bad = []
    for i, s in enumerate(ds):
        n = prompt_length(processor, render_prompt(processor, s, run.rollout.system_prompt), s.image_paths)
        if n is not None and n > limit:
            if run.data.overlong == "error":
                raise DataError.of(
                    s,
                    f"the prompt is {n} tokens, and model.max_model_len={run.model.max_model_len} leaves "
                    "no room for an answer (raise it, lower model.max_pixels, or data.overlong=drop)",
                    run.data.prompt_key,
                )
            bad.append(i)
    if bad:
        log.warning(
            "%s: %d of %d prompts cannot fit model.max_model_len=%d with an answer; dropped "
            "(data/overlong_prompts)",
            name,
            len(bad),
            len(ds),
            run.model.max_model_len,
        )
        if len(bad) == len(ds):
            raise DataError(
                f"every prompt is longer than model.max_model_len={run.model.max_model_len}",
                file=ds.report.file,
            )
    return ds.without(bad) if bad else ds


class Sampler:
    """Deterministic epochs of shuffled indices; its position is part of the run's state."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.position = 0
        self._cached: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation, shuffled once per epoch (not once per index taken)."""
        if self._cached is None or self._cached[0] != epoch:
            idx = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 7919 + epoch).shuffle(idx)
            self._cached = (epoch, idx)
        return self._cached[1]

    def take(self, k: int, advance: bool = True) -> list[int]:
        out, pos = [], self.position
        while len(out) < k:
            epoch, i = divmod(pos, self.n)
            out.append(self._order(epoch)[i])
            pos += 1
        if advance:
            self.position = pos
        return out


class ImageCheck:
    """Decodes each sample's images once, before any engine sees them. A missing or corrupt image
    raises :class:`DataError` (naming file, row and field), or with ``skip_bad_rows`` drops the
    sample and counts it."""

    def __init__(self, skip_bad_rows: bool):
        self.skip = skip_bad_rows
        self.good: set[str] = set()
        self.bad: set[str] = set()

    def filter(self, samples: list) -> list:
        out = []
        for s in samples:
            if s.id in self.bad:
                continue
            if s.id not in self.good:
                try:
                    s.load_images()
                except DataError as e:
                    if not self.skip:
                        raise
                    self.bad.add(s.id)
                    log.warning("skipping bad row: %s", e)
                    continue
                self.good.add(s.id)
            out.append(s)
        return out
