"""Typed run configuration, registered with Hydra's ConfigStore.

Each worker keeps its own dataclass next to its code (``ObjectiveConfig``, ``LearnerConfig``,
``RolloutConfig``, ``SourceConfig``); this module composes them into one :class:`RunConfig` and adds
the few that belong to the run itself. :func:`to_run_config` turns a Hydra ``DictConfig`` into
typed objects and validates them, so a wrong value fails at start-up with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ekipl.algo.objective import ObjectiveConfig
from ekipl.engines.vllm_backend import EngineKeys
from ekipl.learner.config import LearnerConfig
from ekipl.rollout.config import RolloutConfig
from ekipl.rollout.sources import SourceConfig


@dataclasses.dataclass
class ModelConfig(EngineKeys):
    """The policy, and its vLLM engines' settings (``EngineKeys``: gpu_memory_utilization,
    enforce_eager, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, tensor and pipeline
    parallel sizes; unset: the device's defaults)."""

    # A local directory, a tiny model or warm-start name (built on the driver), or a HF id: an id
    # goes to each actor as an id and is resolved on the actor's node, in its HF cache or cache_dir.
    path: str = "tiny-qwen2-vl"
    dtype: str = "float32"
    max_model_len: int = 2048
    engine_replicas: int = 1
    engine_num_cpus: float = 1.0
    engine_num_gpus: float = 0.0
    # Custom Ray resources per policy engine replica (placement on labelled nodes).
    engine_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    # A HF cache on storage every node mounts (None: each node's own HF cache); ids of the policy
    # and of the auxiliary models are resolved there. Nothing is downloaded either way.
    cache_dir: str | None = None
    # The image budget, in pixels per image (None: the processor's own). The same values reach the
    # policy engines, the auxiliary engines (unless aux.NAME sets its own), the learner's processor
    # and validation, so every side counts the same image tokens. Reason-RFT: max_pixels 480,000.
    min_pixels: int | None = None
    max_pixels: int | None = None
    # vLLM's multimodal processor cache per engine, in GiB, held twice (API process and engine core).
    # RL visits each image once per epoch, so it barely hits; 0 turns it off (vLLM's default: 4).
    mm_cache_gb: float = 0.0

    def __post_init__(self):
        for key in ("min_pixels", "max_pixels"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"model.{key} must be >= 1 (or null: the processor's own), got {v}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"model.min_pixels ({self.min_pixels}) is above model.max_pixels ({self.max_pixels})"
            )
        if self.mm_cache_gb < 0:
            raise ValueError(f"model.mm_cache_gb must be >= 0, got {self.mm_cache_gb}")
        self.check_engine_keys("model", self.engine_num_gpus, "engine_num_gpus")


OVERLONG = ("drop", "error")


@dataclasses.dataclass
class DataConfig:
    # A .json/.jsonl/.parquet file, a Dataset.save_to_disk directory (DIR@split for a DatasetDict)
    # or a hub dataset NAME@split; empty: generate the synthetic set for ``synthetic_task``.
    train_file: str = ""
    image_root: str | None = None
    task: str | None = None  # rows without a task column get this one
    # Column names (Reason-RFT's by default); other columns reach reward functions as sample.meta.
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "image"
    cot_key: str = "cot"
    # A prompt that cannot fit model.max_model_len with room for one completion token: dropped at
    # load time and counted (data/overlong_prompts), or refused naming the row (error).
    overlong: str = "drop"
    synthetic_task: str = "counting"
    synthetic_size: int = 64
    synthetic_seed: int | None = None  # the synthetic set's seed (None: trainer.seed)
    skip_bad_rows: bool = False
    prompts_per_step: int = 2
    shuffle: bool = True
    # Held-out splits for validation in the loop (trainer.eval_every): name -> a source of the same
    # forms as train_file. Empty with synthetic data: its test_id and test_ood splits.
    val_files: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.overlong not in OVERLONG:
            raise ValueError(f"data.overlong: unknown {self.overlong!r}; known: {OVERLONG}")

    def columns(self):
        from ekipl.tasks.loader import Columns

        return Columns(self.prompt_key, self.answer_key, self.image_key, self.cot_key)


@dataclasses.dataclass
class RewardConfig:
    accuracy: float = 1.0
    format: float = 1.0
    # strict (default: each tag once, so repeated <think> blocks are not paid) or reason_rft (the
    # published regex, exactly; the paper presets use it). See ekipl.tasks.rewards.
    format_rule: str = "strict"
    # Your own reward: path/to/file.py:name, called as name(completion, sample, **function_kwargs)
    # for every sample (ekipl.tasks.scorer documents the contract); empty: the built-in task rewards.
    function: str = ""
    function_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    timeout_s: float = 10.0  # a reward call that runs longer scores 0 (counted in reward/errors)

    def __post_init__(self):
        from ekipl.tasks.rewards import FORMAT_RULES

        if self.format_rule not in FORMAT_RULES:
            raise ValueError(f"reward.format_rule: unknown {self.format_rule!r}; known: {FORMAT_RULES}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")

    def scorer(self, key: str = "reward.function"):
        """The run's :class:`~ekipl.tasks.scorer.Scorer` (loads ``function``: a bad one raises
        ConfigError naming the key)."""
        from ekipl.tasks.rewards import RewardWeights
        from ekipl.tasks.scorer import RewardFunctionError, Scorer

        try:
            return Scorer(
                RewardWeights(self.accuracy, self.format, self.format_rule),
                self.function,
                self.function_kwargs,
                self.timeout_s,
                key=key,
            )
        except RewardFunctionError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass
class TrainerConfig:
    steps: int = 2
    output_dir: str = "outputs/run"
    save_every: int = 0  # checkpoint every N steps (and at the last step); 0: no checkpoints
    keep_checkpoints: int = 2  # the newest N are kept; 0 keeps all
    # never: start fresh (refuses an output_dir with checkpoints); auto: continue from the newest
    # checkpoint that verifies, if any; or the path of one checkpoint directory
    resume: str = "never"
    max_nonfinite_skips: int = 3  # stop after this many consecutive non-finite (skipped) steps
    seed: int = 0
    ray_address: str | None = None  # None: start a local Ray
    ray_num_cpus: int | None = None
    aux_cache: bool = True
    # Validation in the loop, through the policy engines: every N steps (0: never) and before the
    # first step, on data.val_files; greedy accuracy and format, plus pass@1/pass@k from eval_k
    # samples at eval_temperature when eval_k > 0. eval_limit: first N problems per split (0: all);
    # eval_max_tokens 0: rollout.max_tokens.
    eval_every: int = 0
    eval_before_train: bool = False
    eval_k: int = 0
    eval_temperature: float = 1.0
    eval_limit: int = 0
    eval_max_tokens: int = 0
    # Every N steps (0: never), the first log_samples_groups prompts' candidates (source, completion,
    # reward, selected, advantage) go to <output_dir>/samples.jsonl and to W&B as a table.
    log_samples_every: int = 0
    log_samples_groups: int = 2


@dataclasses.dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "ekipl"
    run_name: str | None = None
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline
    # Online W&B that cannot be reached within this many seconds (a compute node with no route to
    # it): the run goes on offline, with a warning saying how to `wandb sync` it later.
    init_timeout_s: float = 20.0


PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclasses.dataclass
class PlacementConfig:
    """Ray placement groups (ekipl.placement): the learner ranks and the policy engines in one group,
    each auxiliary replica in its own."""

    # STRICT_PACK: the learner ranks and the policy engines on one node, as the /dev/shm weight
    # buffer wants; PACK: on one node where it fits, else across nodes; SPREAD: across nodes.
    strategy: str = "STRICT_PACK"
    aux_strategy: str = "STRICT_PACK"  # each auxiliary replica's bundles (its TP workers: one node)
    timeout_s: float = 300.0  # how long the run waits for Ray to reserve the groups

    def __post_init__(self):
        for key in ("strategy", "aux_strategy"):
            if getattr(self, key) not in PLACEMENT_STRATEGIES:
                raise ValueError(
                    f"placement.{key}: unknown {getattr(self, key)!r}; known: {PLACEMENT_STRATEGIES}"
                )
        if self.timeout_s <= 0:
            raise ValueError(f"placement.timeout_s must be > 0, got {self.timeout_s}")


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    aux: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> SourceConfig fields
    algorithm: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)
    placement: PlacementConfig = dataclasses.field(default_factory=PlacementConfig)


def register() -> None:
    """Register :class:`RunConfig` as Hydra's schema: unknown keys and wrong types fail at
    composition time; :func:`to_run_config` then checks values and combinations."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ekipl_schema", node=RunConfig)


class ConfigError(ValueError):
    pass


def _build(cls, section: str, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        default = getattr(defaults, f.name)
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{section}.{f.name}: expected a boolean, got {v!r}")
        if isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{section}.{f.name}: expected a number, got {v!r}")
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float):
                if not v.is_integer():
                    raise ConfigError(f"{section}.{f.name}: expected an integer, got {v!r}")
                v = int(v)
        kwargs[f.name] = v
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(section) else f"{section}: {msg}") from None


def to_run_config(cfg) -> tuple[RunConfig, list[SourceConfig]]:
    """Typed, validated configs from a DictConfig or a plain dict."""
    try:
        from omegaconf import DictConfig, OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except ImportError:  # pragma: no cover
        raw = dict(cfg)
    raw = {k: v for k, v in raw.items() if k not in ("hydra", "experiment")}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(known)}")
    sections = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "aux":
            continue
        sections[f.name] = _build(type(f.default_factory()), f.name, raw.get(f.name) or {})
    sources = []
    for name, values in (raw.get("aux") or {}).items():
        if values is None:  # an aux source switched off with aux.NAME=null
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"aux.{name}: expected a mapping of source settings, got {values!r}")
        sources.append(_build(SourceConfig, f"aux.{name}", {"name": name, **values}))
    sources = [inherit_image_budget(s, sections["model"]) for s in sources]
    run = RunConfig(aux={s.name: s for s in sources}, **sections)
    validate(run, sources)
    return run, sources


def inherit_image_budget(source: SourceConfig, model: ModelConfig) -> SourceConfig:
    """A model-hosting source's image budget and multimodal cache: its own where set, else the
    policy's (so every side counts the same image tokens). The one place this is derived."""
    if source.kind not in ("vllm", "hf"):
        return source
    return dataclasses.replace(
        source,
        min_pixels=model.min_pixels if source.min_pixels is None else source.min_pixels,
        max_pixels=model.max_pixels if source.max_pixels is None else source.max_pixels,
        mm_cache_gb=model.mm_cache_gb if source.mm_cache_gb is None else source.mm_cache_gb,
    )


def validate(run: RunConfig, sources: list[SourceConfig]) -> None:
    """Cross-field checks: combinations that cannot work."""
    r = run.rollout
    capacity = r.n + sum(s.k for s in sources)
    if r.selection == "topg" and r.group_size > capacity:
        raise ConfigError(
            f"rollout.group_size: G={r.group_size} is larger than the candidates per prompt "
            f"(rollout.n={r.n} + aux k's {[s.k for s in sources]} = {capacity})"
        )
    if r.selection in ("replace", "replace_failed") and not sources:
        raise ConfigError(f"rollout.selection: '{r.selection}' needs at least one aux source")
    if run.data.prompts_per_step * (r.group_size if r.selection == "topg" else r.n) < run.learner.world_size:
        raise ConfigError(
            f"learner.world_size: {run.learner.world_size} ranks but a step has only "
            f"{run.data.prompts_per_step} prompts x {r.group_size} actions"
        )
    if run.trainer.ray_address and run.trainer.ray_num_cpus is not None:
        raise ConfigError("trainer.ray_num_cpus sets up a local Ray; leave it unset with trainer.ray_address")
    t = run.trainer
    if t.steps < 1:
        raise ConfigError("trainer.steps must be >= 1")
    for key in (
        "eval_every",
        "eval_k",
        "eval_limit",
        "eval_max_tokens",
        "log_samples_every",
        "log_samples_groups",
    ):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(t, key)}")
    if (t.eval_every or t.eval_before_train) and run.data.train_file and not run.data.val_files:
        raise ConfigError(
            "trainer.eval_every/eval_before_train: validation needs held-out splits; give them as "
            "+data.val_files.NAME=FILE (synthetic data brings its own test_id/test_ood)"
        )
    if t.save_every < 0 or t.keep_checkpoints < 0 or t.max_nonfinite_skips < 1:
        raise ConfigError(
            "trainer.save_every and trainer.keep_checkpoints must be >= 0, trainer.max_nonfinite_skips >= 1"
        )
    if t.resume not in ("never", "auto") and not os.path.isdir(t.resume):
        raise ConfigError(
            f"trainer.resume: {t.resume!r} is neither 'never', 'auto' nor a checkpoint directory"
        )
    if run.logger.init_timeout_s <= 0:
        raise ConfigError(f"logger.init_timeout_s must be > 0, got {run.logger.init_timeout_s}")
    if run.logger.mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"logger.mode: unknown {run.logger.mode!r}; known: auto, online, offline, disabled")
