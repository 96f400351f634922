"""What the driver commands (``ekipl.train``, ``ekipl.sft``) share around their loops: models and
data resolved from config, the deterministic sampler, the image check, Ray start-up and resource
checks, the policy export, and the Hydra entry point. Nothing here runs a step."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

from ekipl.config import ConfigError, RunConfig
from ekipl.tasks.sample import TASKS, DataError

log = logging.getLogger("ekipl.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. K consecutive non-finite steps); the last checkpoint is intact."""


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


def compose(overrides) -> object:
    """The Hydra config that ``python -m ekipl.train OVERRIDES...`` would run (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ekipl.config import register

    register()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir):
        return hydra_compose(config_name="config", overrides=list(overrides))


def config_tree(cfg) -> dict:
    """A Hydra DictConfig (or a plain dict) as a resolved plain dict."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def init_ray(run: RunConfig) -> bool:
    """Join ``trainer.ray_address`` or start a local Ray, unless Ray is already up (tests, jobs).
    Returns whether this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(
        address=run.trainer.ray_address,
        num_cpus=run.trainer.ray_num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def hydra_main(run_fn) -> None:
    """The command-line entry of ``ekipl.train`` and ``ekipl.sft``: Hydra composes ``conf/``, then
    ``run_fn(cfg)``. Bad config or data exits 2 with the message; a run that had to stop exits 1."""
    import hydra

    from ekipl.config import register

    register()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="config")
    def _main(cfg) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            summary = run_fn(cfg)
        except (ConfigError, DataError) as e:
            print(f"ekipl: error: {e}", file=sys.stderr)
            sys.exit(2)
        except TrainingError as e:
            print(f"ekipl: run stopped: {e}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))

    _main()
