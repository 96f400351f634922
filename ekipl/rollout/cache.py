"""A content-addressed on-disk cache of auxiliary actions.

Auxiliary actions do not depend on the policy's weights, so a resumed or multi-epoch run never
needs to pay twice for the same call. The key is a hash of (source model, prompt, image bytes,
sampling parameters); the value is the list of completion texts. Entries are written atomically
(temporary file, then rename), so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ekipl.tasks.sample import file_digest


def cache_key(model: str, prompt: str, image_paths: list[str] | tuple[str, ...], params: dict) -> str:
    blob = json.dumps(
        {"model": model, "prompt": prompt, "images": [file_digest(p) for p in image_paths], "params": params},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ActionCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[str] | None:
        p = self._path(key)
        try:
            texts = json.loads(p.read_text())["texts"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            self.misses += 1
            return None
        self.hits += 1
        return texts

    def put(self, key: str, texts: list[str], meta: dict | None = None) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"texts": list(texts), "meta": meta or {}}, f)
        os.replace(tmp, p)

    def keys(self) -> list[str]:
        """The index of cached entries (saved with checkpoints)."""
        return sorted(p.stem for p in self.root.glob("*/*.json"))
