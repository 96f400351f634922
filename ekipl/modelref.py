"""The models a run names, on the driver: a tiny model or warm-start name built, a local directory,
an adapter merged into its base, or a HF id found in the local cache (and what each actor gets:
:func:`actor_model`); the family check; and the trained policy's export. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ekipl.config import ConfigError


def resolve_model(path: str, seed: int = 0, key: str = "model.path", cache_dir: str | None = None) -> str:
    """A model's directory on the driver: a local directory as is; a tiny model or warm-start name
    built locally (cached); a HF id's snapshot in the local HF cache (or ``cache_dir``), where the
    driver needs only its config, tokenizer and processor files. Anything else raises
    :class:`ConfigError` naming ``key`` (nothing is downloaded). The actors get :func:`actor_model`."""
    from ekipl.models.resolve import ModelNotFoundError, looks_local, on_node
    from ekipl.models.tiny import TINY_MODELS, build_tiny
    from ekipl.warm import WARM_STARTS, build_warm

    if path in TINY_MODELS:
        return str(build_tiny(path, seed=seed))
    if path in WARM_STARTS:
        return str(build_warm(path, seed=seed))
    local = Path(path).expanduser()
    if local.is_dir() and (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        return merge_adapter(local, seed, key)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is a directory without a config.json (not a model)")
    if looks_local(path) and not local.is_dir():
        raise ConfigError(
            f"{key}: {path!r} is neither a model directory, a tiny model or warm-start name, nor a HF id"
        )
    try:
        return on_node(path, cache_dir, key)
    except ModelNotFoundError as e:
        raise ConfigError(
            f"{e}. The driver's node needs the model's config, tokenizer and processor files only "
            f"(huggingface-cli download {path} --include '*.json' '*.txt' '*.jinja'); the nodes that "
            "run it need the weights"
        ) from None


def actor_model(path: str, resolved: str) -> str:
    """What an actor is given for the model ``path`` that the driver resolved to ``resolved``: a HF id
    as the id (each node resolves it in its own cache, :func:`ekipl.models.resolve.on_node`), anything
    built or found locally as its directory."""
    from ekipl.models.resolve import is_hub_id
    from ekipl.models.tiny import TINY_MODELS
    from ekipl.warm import WARM_STARTS

    if path in TINY_MODELS or path in WARM_STARTS or not is_hub_id(path):
        return resolved
    return path


def merge_adapter(adapter_dir: Path, seed: int = 0, key: str = "model.path") -> str:
    """A LoRA adapter directory (peft's layout, as ``export`` writes under ``policy/adapter``) merged
    into its base model, once: ``<adapter_dir>/merged`` in ``save_pretrained``'s layout."""
    out = adapter_dir / "merged"
    if (out / "config.json").is_file():
        return str(out)
    from peft import PeftModel

    from ekipl.models import hf

    base_ref = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise ConfigError(f"{key}: {adapter_dir}/adapter_config.json names no base_model_name_or_path")
    base = resolve_model(base_ref, seed, f"{key} (the adapter's base model)")
    merged = PeftModel.from_pretrained(hf.load_model(base), str(adapter_dir)).merge_and_unload()
    tmp = adapter_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    for f in Path(base).iterdir():  # the processor and tokenizer files
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, out)
    return str(out)


def check_family(path: str, key: str = "model.path") -> None:
    """Refuse, naming ``key``, a policy whose model type no family of the registry names (the
    learner's packing, freezing and mixed-batch code is written per family)."""
    from ekipl.models.families import UnsupportedModelError, family_of, model_type

    try:
        family_of(model_type(path))
    except UnsupportedModelError as e:
        raise ConfigError(f"{key}: {path}: {e}") from None


def export_policy(learner, model_path: str, out: Path) -> None:
    """Write the trained policy in ``save_pretrained``'s layout (weights + config + processor)."""
    out.mkdir(parents=True, exist_ok=True)
    learner.export_weights(str(out / "model.safetensors"))  # with LoRA: the merged weights
    if learner.cfg.lora.enabled:  # and the adapters alone, in peft's layout
        learner.export_adapter(str(out / "adapter"))
    src = Path(model_path)
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin"))
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy2(f, out / f.name)
