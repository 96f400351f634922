"""``python -m ekipl.train``: the EKIPL run, end to end (Hydra).

The driver loop, per step::

    prefetch aux actions for the next batch -> policy rollout -> rewards and selection
    -> advantages -> learner update (μ epochs) -> weight sync -> log

Configs live in ``conf/`` (``+experiment=cpu_demo`` runs the tiny CPU demo). Metrics go to
``<output_dir>/metrics.jsonl`` always, and to W&B (online with WANDB_API_KEY, offline otherwise).
At the end the policy is exported with ``save_pretrained``'s layout to ``<output_dir>/policy``.
Bad data or config exits with code 2 and a message naming the key, file, row or field.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from ekipl.config import ConfigError, RunConfig, to_run_config
from ekipl.tasks.sample import DataError

log = logging.getLogger("ekipl.train")

# Config keys whose values are secrets: "api_key", "wandb_token", "secret", "password"... but not
# "max_tokens" or "api_key_env" (which holds a variable's name, not its value).
SECRET_KEY = re.compile(r"(^|_)(key|token|secret|password)$", re.IGNORECASE)


def redact(obj):
    """A copy of a config tree with values under secret-looking keys replaced (names stay)."""
    if isinstance(obj, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def resolve_model(path: str, seed: int = 0) -> str:
    """A local directory as is; a tiny model name is built locally; anything else is a HF id."""
    from ekipl.models.tiny import TINY_MODELS, build_tiny

    if path in TINY_MODELS:
        return str(build_tiny(path, seed=seed))
    return path


class MetricsLog:
    """metrics.jsonl, always; W&B when enabled (offline without a key)."""

    def __init__(self, run: RunConfig, out: Path, config_tree: dict):
        self.path = out / "metrics.jsonl"
        self.path.write_text("")  # a fresh run starts a fresh file (there is no resume yet)
        self.wandb = None
        if run.logger.wandb and run.logger.mode != "disabled":
            import wandb

            mode = run.logger.mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=run.logger.project,
                name=run.logger.run_name,
                mode=mode,
                dir=str(out),
                config=redact(config_tree),
                reinit="finish_previous",
            )

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _load_data(run: RunConfig, out: Path):
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.synth import make_dataset

    d = run.data
    if d.train_file:
        return load_task_file(
            d.train_file, image_root=d.image_root, task=d.task, skip_bad_rows=d.skip_bad_rows
        )
    paths = make_dataset(
        d.synthetic_task,
        out / "data",
        n_train=d.synthetic_size,
        n_test=max(4, d.synthetic_size // 4),
        seed=run.trainer.seed,
    )
    return load_task_file(paths["train"], skip_bad_rows=d.skip_bad_rows)


class Sampler:
    """Deterministic epochs of shuffled indices; its position is part of the run's state."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(idx)
        return idx

    def take(self, k: int, advance: bool = True) -> list[int]:
        out, pos = [], self.position
        while len(out) < k:
            epoch, i = divmod(pos, self.n)
            out.append(self._order(epoch)[i])
            pos += 1
        if advance:
            self.position = pos
        return out


def run(cfg) -> dict:
    """Run training from a Hydra DictConfig (or a plain dict). Returns a summary."""
    import ray

    from ekipl.algo.objective import group_advantages
    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.batch import collate
    from ekipl.learner.group import LearnerGroup
    from ekipl.models import hf
    from ekipl.rollout.cache import ActionCache
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.rollout.policy import PolicyRouter
    from ekipl.rollout.sources import make_source
    from ekipl.tasks.rewards import RewardWeights

    try:
        from omegaconf import DictConfig, OmegaConf

        tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except ImportError:  # pragma: no cover
        tree = dict(cfg)
    run_cfg, source_cfgs = to_run_config(tree)
    out = Path(run_cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(redact(tree), indent=1, default=str))
    torch.manual_seed(run_cfg.trainer.seed)
    random.seed(run_cfg.trainer.seed)

    data = _load_data(run_cfg, out)
    model_path = resolve_model(run_cfg.model.path, run_cfg.model.seed)
    for s in source_cfgs:
        if s.kind in ("vllm", "hf"):
            s.model = resolve_model(s.model, run_cfg.model.seed)
    processor = hf.load_processor(model_path)

    started_ray = False
    if not ray.is_initialized():
        ray.init(
            address=run_cfg.trainer.ray_address,
            num_cpus=run_cfg.trainer.ray_num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        started_ray = True
    router = learner = coord = metrics_log = None
    sources: list = []
    summary = {"steps": 0, "skipped_steps": 0}
    try:
        check_resources(run_cfg, source_cfgs, ray.cluster_resources())
        t0 = time.perf_counter()
        spec = vb.EngineSpec(
            model=model_path,
            dtype=run_cfg.model.dtype,
            seed=run_cfg.model.seed,
            max_model_len=run_cfg.model.max_model_len,
        )
        router = PolicyRouter(
            spec,
            replicas=run_cfg.model.engine_replicas,
            num_cpus=run_cfg.model.engine_num_cpus,
            num_gpus=run_cfg.model.engine_num_gpus,
        )
        sources = [make_source(s, seed=run_cfg.trainer.seed) for s in source_cfgs]
        learner = LearnerGroup(model_path, run_cfg.learner, run_cfg.algorithm, seed=run_cfg.trainer.seed)
        router.ready()
        for s in sources:
            if hasattr(s, "ready"):
                s.ready()
        log.info("engines and learners up in %.1fs", time.perf_counter() - t0)
        cache = ActionCache(out / "aux_cache") if run_cfg.trainer.aux_cache else None
        coord = RolloutCoordinator(
            run_cfg.rollout,
            router,
            sources,
            processor,
            RewardWeights(run_cfg.reward.accuracy, run_cfg.reward.format),
            cache,
        )
        metrics_log = MetricsLog(run_cfg, out, redact(tree))
        sampler = Sampler(len(data), run_cfg.trainer.seed, run_cfg.data.shuffle)
        k = run_cfg.data.prompts_per_step
        from tqdm import tqdm

        for step in tqdm(range(1, run_cfg.trainer.steps + 1), desc="ekipl", disable=None):
            ts = time.perf_counter()
            samples = [data[i] for i in sampler.take(k)]
            coord.prefetch([data[i] for i in sampler.take(k, advance=False)])  # the next batch, ahead
            groups, m = coord.rollout(samples)
            if sum(len(g.actions) for g in groups) < run_cfg.learner.world_size:
                summary["skipped_steps"] += 1
                m["trainer/skipped_step"] = 1.0
                metrics_log.log(step, m)
                log.warning(
                    "step %d: after dropping tied groups, fewer actions than learner ranks; skipped", step
                )
                continue
            rewards = torch.tensor([a.reward for g in groups for a in g.actions])
            gidx = torch.tensor([i for i, g in enumerate(groups) for _ in g.actions])
            is_pol = torch.tensor([a.is_policy for g in groups for a in g.actions])
            adv = group_advantages(rewards, gidx, is_pol, run_cfg.algorithm.advantage, run_cfg.algorithm.eps)
            batch = collate(groups, processor, adv)
            m.update(learner.train_step(batch))
            m.update(learner.sync_weights(router.actors))
            m["timing/step"] = time.perf_counter() - ts
            m["perf/policy_tokens_per_s"] = m["rollout/policy_tokens"] / max(m["timing/rollout"], 1e-9)
            metrics_log.log(step, m)
            summary["steps"] += 1
            summary["last"] = m
        export = out / "policy"
        export_policy(learner, model_path, export)
        summary["export"] = str(export)
    finally:  # also when start-up fails half way: no actor outlives the run
        if metrics_log is not None:
            metrics_log.close()
        if coord is not None:
            coord.shutdown()
        else:
            for src in sources:
                src.shutdown()
        if learner is not None:
            learner.shutdown()
        for actor in router.actors if router is not None else []:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    return summary


def check_resources(run: RunConfig, sources, cluster: dict) -> None:
    """Fail at start-up, naming the keys, when the actors cannot all be placed at once."""
    need_cpu = run.model.engine_replicas * run.model.engine_num_cpus
    need_cpu += run.learner.world_size * run.learner.num_cpus_per_worker
    need_gpu = run.model.engine_replicas * run.model.engine_num_gpus
    need_gpu += run.learner.world_size * run.learner.num_gpus_per_worker
    for s in sources:
        if s.kind == "vllm":
            need_cpu += s.replicas * s.num_cpus
            need_gpu += s.replicas * s.num_gpus
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise ConfigError(
            f"the actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs but the Ray cluster has {have_cpu:g} "
            f"and {have_gpu:g}: lower model.engine_num_cpus, aux.*.num_cpus, learner.num_cpus_per_worker or "
            f"learner.world_size, or give Ray more (trainer.ray_num_cpus sets logical CPUs of a local Ray)"
        )


def export_policy(learner, model_path: str, out: Path) -> None:
    """Write the trained policy in ``save_pretrained``'s layout (weights + config + processor)."""
    out.mkdir(parents=True, exist_ok=True)
    learner._call("export_weights", [str(out / "model.safetensors")] * learner.cfg.world_size)
    src = Path(model_path)
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin"))
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy2(f, out / f.name)


def main() -> None:
    import hydra

    from ekipl.config import register

    register()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="config")
    def _main(cfg) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            summary = run(cfg)
        except (ConfigError, DataError) as e:
            print(f"ekipl: error: {e}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))

    _main()


if __name__ == "__main__":
    main()
