"""A model reference (a local directory or a HF id) as a directory on this node. Nothing is
downloaded: an id must already be in this node's HF cache, or in ``model.cache_dir`` (a HF cache on
storage every node mounts).

A HF id travels to each actor as an id and is resolved there, on the node that runs it, so the
driver's node never needs the weights of a model it does not run (it reads only the config,
tokenizer and processor files, for prompts and the plan)."""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(ValueError):
    """A model reference that does not resolve on this node."""


def looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1


def is_hub_id(ref: str) -> bool:
    return not looks_local(ref) and not Path(ref).expanduser().is_dir()


def on_node(ref: str, cache_dir: str | None = None, key: str = "model.path") -> str:
    """``ref`` as a directory on this node: a local directory as is, an id's snapshot in the HF
    cache (``cache_dir``, else this node's). Raises :class:`ModelNotFoundError` naming ``key`` and
    the node."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return str(local)
    if not looks_local(ref):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        try:
            return snapshot_download(ref, cache_dir=cache_dir, local_files_only=True)
        except (OSError, HFValidationError):
            pass
    import socket

    where = (
        f"model.cache_dir={cache_dir}"
        if cache_dir
        else f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}"
    )
    raise ModelNotFoundError(
        f"{key}: {ref!r} is neither a model directory nor a HF id in the local cache of node "
        f"{socket.gethostname()} ({where}). Nothing is downloaded at run time: fetch it first on every "
        f"node that runs it (huggingface-cli download {ref}), or set model.cache_dir to a HF cache on "
        "storage every node mounts"
    )
