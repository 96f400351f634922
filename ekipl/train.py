"""``python -m ekipl.train``: the EKIPL run, end to end (Hydra).

The driver loop, per step::

    prefetch aux actions for the next batch -> policy rollout -> rewards and selection
    -> advantages -> learner update (μ epochs) -> weight sync -> log

With ``rollout.one_step_off`` the next batch's policy rollout starts before the update (with the
weights this batch was sampled with) and the sync waits for it: rollout overlaps the update, and
the policy learns from actions one update stale.

Configs live in ``conf/`` (``+experiment=cpu_demo`` runs the tiny CPU demo). Metrics go to
``<output_dir>/metrics.jsonl`` always, and to W&B (online with WANDB_API_KEY, offline otherwise).
At the end the policy is exported with ``save_pretrained``'s layout to ``<output_dir>/policy``.
Bad data or config exits with code 2 and a message naming the key, file, row or field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from ekipl import checkpoint as ckpt
from ekipl.config import ConfigError, RunConfig, to_run_config
from ekipl.metrics import MetricsLog, redact
from ekipl.tasks.sample import DataError

log = logging.getLogger("ekipl.train")


def resolve_model(path: str, seed: int = 0) -> str:
    """A local directory as is; a tiny model name is built locally; anything else is a HF id."""
    from ekipl.models.tiny import TINY_MODELS, build_tiny

    if path in TINY_MODELS:
        return str(build_tiny(path, seed=seed))
    return path


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


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. K consecutive non-finite steps); the last checkpoint is intact."""


@dataclasses.dataclass
class Hooks:
    """Test seams for fault injection: called by the driver, never needed by a real run.

    ``after_step(step, ctx)`` runs after a step is logged (and checkpointed); ``before_update(step,
    batch)`` may alter the learner's batch. ``ctx`` holds the live objects (router, sources,
    learner, coordinator).
    """

    after_step: object = None
    before_update: object = None


def find_resume(run: RunConfig, root: Path):
    """(checkpoint dir, driver state) to resume from, or None for a fresh start."""
    mode = run.trainer.resume
    if mode == "never":
        if ckpt.checkpoints(root):
            raise ConfigError(
                f"trainer.resume: {root} already holds checkpoints of an earlier run; set "
                "trainer.resume=auto to continue it, or choose another trainer.output_dir"
            )
        return None
    if mode == "auto":
        found = ckpt.latest(root)
        if found is None and ckpt.checkpoints(root):
            raise ConfigError(f"trainer.resume=auto: no checkpoint under {root} verifies (see the log)")
        return found
    try:
        return Path(mode), ckpt.verify(Path(mode))
    except ckpt.CheckpointError as e:
        raise ConfigError(f"trainer.resume: {e}") from None


def run(cfg, hooks: Hooks | None = None) -> dict:
    """Run training from a Hydra DictConfig (or a plain dict). Returns a summary."""
    import ray

    from ekipl.engines import vllm_backend as vb
    from ekipl.learner.group import LearnerError, LearnerGroup
    from ekipl.models import hf
    from ekipl.rollout.cache import ActionCache
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.rollout.policy import PolicyEngineError, PolicyRouter
    from ekipl.rollout.sources import make_source
    from ekipl.tasks.rewards import RewardWeights

    hooks = hooks or Hooks()
    tree = config_tree(cfg)
    run_cfg, source_cfgs = to_run_config(tree)
    out = Path(run_cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    resume = find_resume(run_cfg, ckpt_root)
    if resume is not None:
        _check_compatible(run_cfg, resume[1])
    (out / "config.json").write_text(json.dumps(redact(tree), indent=1, default=str))
    torch.manual_seed(run_cfg.trainer.seed)
    random.seed(run_cfg.trainer.seed)

    data = _load_data(run_cfg, out)
    model_path = resolve_model(run_cfg.model.path, run_cfg.model.seed)
    for s in source_cfgs:
        if s.kind in ("vllm", "hf"):
            s.model = resolve_model(s.model, run_cfg.model.seed)
    processor = hf.load_processor(model_path)

    started_ray = init_ray(run_cfg)
    router = learner = coord = metrics_log = None
    sources: list = []
    summary = {"steps": 0, "skipped_steps": 0, "start_step": 0}
    try:
        check_resources(run_cfg, source_cfgs, ray.cluster_resources())
        t0 = time.perf_counter()
        spec = vb.EngineSpec(
            model=model_path,
            dtype=run_cfg.model.dtype,
            seed=run_cfg.model.seed,
            max_model_len=run_cfg.model.max_model_len,
            tensor_parallel_size=run_cfg.model.tensor_parallel_size,
        )
        # On CPU, the policy and aux engines generate at the same time (prefetch): they split the
        # cores; with one-step-off rollout the learner's update runs beside them too and takes a share.
        engines = run_cfg.model.engine_replicas + sum(s.replicas for s in source_cfgs if s.kind == "vllm")
        engines += int(run_cfg.rollout.one_step_off)
        router = PolicyRouter(
            spec,
            replicas=run_cfg.model.engine_replicas,
            num_cpus=run_cfg.model.engine_num_cpus,
            num_gpus=run_cfg.model.engine_num_gpus,
            resources=run_cfg.model.engine_resources,
            engine_share=engines,
        )
        sources = [make_source(s, seed=run_cfg.trainer.seed, engine_share=engines) for s in source_cfgs]
        learner = LearnerGroup(
            model_path,
            run_cfg.learner,
            run_cfg.algorithm,
            seed=run_cfg.trainer.seed,
            resources=run_cfg.learner.resources,
        )
        router.ready()
        for s in sources:
            if hasattr(s, "ready"):
                s.ready()
        learner.ready()
        log.info("engines and learners up in %.1fs", time.perf_counter() - t0)
        write_placement(out / "placement.json", router, sources, learner)
        cache = ActionCache(out / "aux_cache") if run_cfg.trainer.aux_cache else None
        coord = RolloutCoordinator(
            run_cfg.rollout,
            router,
            sources,
            processor,
            RewardWeights(run_cfg.reward.accuracy, run_cfg.reward.format),
            cache,
        )
        sampler = Sampler(len(data), run_cfg.trainer.seed, run_cfg.data.shuffle)
        images = ImageCheck(run_cfg.data.skip_bad_rows)
        state = {"consecutive_skips": 0, "wandb_id": None}
        if resume is not None:
            path, saved = resume
            t1 = time.perf_counter()
            learner.load_checkpoint(str(path / "learner"))
            sampler.position = saved["sampler_position"]
            ckpt.set_rng_state(saved["rng"])
            summary.update(steps=saved["steps_done"], skipped_steps=saved["skipped_steps"])
            state.update(consecutive_skips=saved["consecutive_skips"], wandb_id=saved.get("wandb_id"))
            if run_cfg.rollout.one_step_off:
                coord.restore_early(saved.get("early_rollout"))
            summary["start_step"] = saved["step"]
            if cache is not None:
                missing = [k for k in saved.get("aux_cache_keys", []) if cache.get(k) is None]
                if missing:
                    log.warning(
                        "resume: %d aux cache entries of the checkpoint are gone (regenerated)", len(missing)
                    )
            learner.sync_weights(router.actors)  # the engines started from the base weights
            log.info("resumed from %s (step %d) in %.1fs", path, saved["step"], time.perf_counter() - t1)
        metrics_log = MetricsLog(
            run_cfg.logger, out, redact(tree), resume_step=summary["start_step"], wandb_id=state["wandb_id"]
        )
        ctx = {"router": router, "sources": sources, "learner": learner, "coordinator": coord}
        from tqdm import tqdm

        first, last = summary["start_step"] + 1, run_cfg.trainer.steps
        try:
            for step in tqdm(
                range(first, last + 1), desc="ekipl", initial=first - 1, total=last, disable=None
            ):
                m = _step(run_cfg, step, data, sampler, images, coord, learner, router, processor, hooks)
                skipped = m.get("trainer/skipped_step", 0.0) > 0
                summary["skipped_steps" if skipped else "steps"] += 1
                state["consecutive_skips"] = (
                    state["consecutive_skips"] + 1 if m.get("actor/skipped_step") else 0
                )
                m["trainer/consecutive_nonfinite_skips"] = float(state["consecutive_skips"])
                metrics_log.log(step, m)
                summary["last"] = m
                every = run_cfg.trainer.save_every
                if every and (step % every == 0 or step == last):
                    _save(
                        run_cfg, ckpt_root, step, learner, coord, cache, sampler, summary, state, metrics_log
                    )
                if hooks.after_step is not None:
                    hooks.after_step(step, ctx)
                if state["consecutive_skips"] >= run_cfg.trainer.max_nonfinite_skips:
                    raise TrainingError(
                        f"{state['consecutive_skips']} consecutive steps had a non-finite loss or gradient "
                        f"and were skipped (trainer.max_nonfinite_skips="
                        f"{run_cfg.trainer.max_nonfinite_skips}); the weights are those of the last good "
                        "step. Lower learner.lr or check the rewards and data."
                    )
        except (LearnerError, PolicyEngineError) as e:
            found = ckpt.latest(ckpt_root)
            where = (
                f"the last checkpoint is {found[0]} (step {found[1]['step']}); continue with "
                "trainer.resume=auto"
                if found
                else "there is no checkpoint to resume from yet"
                + ("" if run_cfg.trainer.save_every else " (trainer.save_every=0 writes none)")
            )
            raise TrainingError(f"{e}; {where}") from e
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


def _step(run_cfg, step, data, sampler, images, coord, learner, router, processor, hooks) -> dict:
    """One EKIPL step: rollout (aux prefetched ahead) -> advantages -> update -> weight sync."""
    from ekipl.algo.objective import group_advantages
    from ekipl.learner.batch import collate

    ts = time.perf_counter()
    k = run_cfg.data.prompts_per_step
    samples = images.filter([data[i] for i in sampler.take(k)])
    upcoming = images.filter([data[i] for i in sampler.take(k, advance=False)])  # the next batch
    coord.prefetch(upcoming)
    if not samples:
        log.warning("step %d: every sample of the batch had a bad image; skipped", step)
        return {"trainer/skipped_step": 1.0, "data/bad_rows_skipped": float(len(images.bad))}
    groups, m = coord.rollout(samples, step=step)
    if run_cfg.rollout.one_step_off and upcoming:
        coord.start_early(upcoming, step + 1)  # with these weights, while the learner updates
    m["data/bad_rows_skipped"] = float(len(images.bad))
    if sum(len(g.actions) for g in groups) < run_cfg.learner.world_size:
        m["trainer/skipped_step"] = 1.0
        log.warning("step %d: after dropping tied groups, fewer actions than learner ranks; skipped", step)
        return m
    rewards = torch.tensor([a.reward for g in groups for a in g.actions])
    gidx = torch.tensor([i for i, g in enumerate(groups) for _ in g.actions])
    is_pol = torch.tensor([a.is_policy for g in groups for a in g.actions])
    adv = group_advantages(rewards, gidx, is_pol, run_cfg.algorithm.advantage, run_cfg.algorithm.eps)
    batch = collate(groups, processor, adv)
    if hooks.before_update is not None:
        hooks.before_update(step, batch)
    m.update(learner.train_step(batch))
    if m.get("actor/skipped_step"):
        # The weights did not change, so the engines are already in sync: nothing non-finite
        # ever reaches them.
        log.warning("step %d: non-finite loss or gradient; the optimizer step was skipped", step)
        m["timing/weight_sync"] = 0.0
    else:
        m.update(learner.sync_weights(router.actors))
    m["timing/step"] = time.perf_counter() - ts
    m["perf/policy_tokens_per_s"] = m["rollout/policy_tokens"] / max(m["timing/rollout"], 1e-9)
    return m


def _save(run_cfg, root, step, learner, coord, cache, sampler, summary, state, metrics_log) -> None:
    t0 = time.perf_counter()
    coord.drain()  # prefetched aux actions land in the cache first, so the index below is complete
    driver_state = {
        "sampler_position": sampler.position,
        "rng": ckpt.rng_state(),
        "steps_done": summary["steps"],
        "skipped_steps": summary["skipped_steps"],
        "consecutive_skips": state["consecutive_skips"],
        "wandb_id": metrics_log.run_id,
        "aux_cache_keys": cache.keys() if cache is not None else [],
        "early_rollout": coord.early_state(),  # one-step-off: the next step's actions, already sampled
        "world_size": run_cfg.learner.world_size,
        "zero_stage": run_cfg.learner.zero_stage,
        "dataset_size": sampler.n,
    }
    path = ckpt.save(
        root,
        step,
        lambda d: learner.save_checkpoint(str(d)),
        driver_state,
        keep=run_cfg.trainer.keep_checkpoints,
    )
    log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - t0)


def _check_compatible(run: RunConfig, saved: dict) -> None:
    """A checkpoint's ZeRO partitions only load into the same layout; the sampler into the same data."""
    for key, now in (("world_size", run.learner.world_size), ("zero_stage", run.learner.zero_stage)):
        if saved.get(key) is not None and saved[key] != now:
            raise ConfigError(
                f"learner.{key}: the checkpoint was written with {key}={saved[key]}, this run has {now}; "
                "resume with the same value"
            )
    if run.trainer.steps <= saved["step"]:
        raise ConfigError(
            f"trainer.steps: the checkpoint is at step {saved['step']}, so steps={run.trainer.steps} leaves "
            "nothing to do; raise trainer.steps to train further"
        )


def write_placement(path: Path, router, sources, learner) -> dict:
    """Which Ray node each actor landed on (logged, and written to ``placement.json``)."""
    import ray

    nodes = {
        "policy": ray.get([a.node_id.remote() for a in router.actors]),
        "learner": ray.get([w.node_id.remote() for w in learner.workers]),
        "aux": {
            s.name: ray.get([a.node_id.remote() for a in s.actors]) for s in sources if hasattr(s, "actors")
        },
    }
    path.write_text(json.dumps(nodes, indent=1))
    log.info("placement (Ray node ids): %s", json.dumps(nodes))
    return nodes


def check_resources(run: RunConfig, sources, cluster: dict) -> None:
    """Fail at start-up, naming the keys, when the actors cannot all be placed at once."""
    need: dict[str, float] = {}

    def add(n: float, cpus: float, gpus: float, custom: dict):
        for name, amount in (("CPU", cpus), ("GPU", gpus), *custom.items()):
            need[name] = need.get(name, 0.0) + n * float(amount)

    m, lc = run.model, run.learner
    add(m.engine_replicas, m.engine_num_cpus, m.engine_num_gpus, m.engine_resources)
    add(lc.world_size, lc.num_cpus_per_worker, lc.num_gpus_per_worker, lc.resources)
    for s in sources:
        if s.kind == "vllm":
            add(s.replicas, s.num_cpus, s.num_gpus, s.resources)
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU") and v > cluster.get(k, 0.0)}
    if custom:
        raise ConfigError(
            "the actors need custom Ray resources the cluster lacks: "
            + ", ".join(f"{k}={v:g} (cluster has {cluster.get(k, 0.0):g})" for k, v in custom.items())
            + "; start nodes with --resources, or change model.engine_resources, aux.*.resources or "
            "learner.resources"
        )
    need_cpu, need_gpu = need.get("CPU", 0.0), need.get("GPU", 0.0)
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
    learner.export_weights(str(out / "model.safetensors"))
    src = Path(model_path)
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin"))
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy2(f, out / f.name)


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


def main() -> None:
    hydra_main(run)


if __name__ == "__main__":
    main()
