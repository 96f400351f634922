"""Run checkpoints: atomic on disk and verified when loaded.

Layout under ``<output_dir>/checkpoints/``::

    step_000012/
        learner/          DeepSpeed's checkpoint (module, ZeRO optimizer partitions, LR schedule),
                          written by every learner rank
        state.json        the driver's state: step, sampler position, RNG states, aux cache index,
                          counters, W&B run id
        MANIFEST.json     size and sha256 of every other file; written last

A checkpoint is built in a hidden temporary directory and renamed into place only when complete
(a directory rename is atomic on POSIX), so a crash mid-save leaves the previous checkpoint as the
newest. :func:`latest` returns the newest checkpoint whose manifest matches its files; corrupt
ones are reported and passed over. Pure file I/O: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from ekipl.tasks.sample import file_digest

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
STATE = "state.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and where."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """The driver's RNG states as JSON-able data (no pickle in checkpoints)."""
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def save(root: Path, step: int, write_learner: Callable[[Path], None], state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` (0 keeps all).

    ``write_learner(dir)`` writes the learner's files into ``dir`` (every rank must be able to reach
    it: one host, or a shared file system).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{PREFIX}{step:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_learner(tmp / "learner")
        (tmp / STATE).write_text(json.dumps({"step": step, **state}))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": step,
            "files": {
                str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files
            },
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = step_dir(root, step)
        if final.exists():  # the same step saved again after a resume: replace it
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(path: Path) -> dict:
    """Check every file against the manifest; return the driver state. Raises CheckpointError."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (not a complete ekipl checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: file {rel} listed in the manifest is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{path}: file {rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
            )
        if file_digest(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {rel} does not match its sha256 in the manifest (corrupt)")
    try:
        state = json.loads((path / STATE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE} ({e})") from None
    if state.get("step") != manifest.get("step"):
        raise CheckpointError(f"{path}: {STATE} and {MANIFEST} disagree on the step")
    return state


def latest(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, with its state; corrupt ones are logged and skipped."""
    for path in reversed(checkpoints(root)):
        try:
            return path, verify(path)
        except CheckpointError as e:
            log.error("skipping checkpoint: %s", e)
    return None
