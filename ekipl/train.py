"""``python -m ekipl.train``: the EKIPL run, end to end (Hydra).

The driver loop, per step::

    prefetch aux actions for the next batch -> policy rollout -> rewards and selection
    -> advantages -> learner update (μ epochs) -> weight sync -> log

With ``rollout.max_staleness=N`` (``rollout.one_step_off`` is N=1) the policy rollouts of the next
N batches run ahead: each starts before an update, with the weights the engines have then, and a
sync waits for the generations queued before it. Rollout overlaps the update, and the policy learns
from actions up to N updates stale (``rollout/staleness_*``; ``algorithm.rollout_correction``
corrects for it).

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
import time
from pathlib import Path

import torch

from ekipl import checkpoint as ckpt
from ekipl.cluster import TrainingError, config_tree, hydra_main, init_ray
from ekipl.config import ConfigError, RunConfig, to_run_config
from ekipl.data import ImageCheck, Sampler, drop_overlong, load_data
from ekipl.metrics import MetricsLog, redact
from ekipl.modelref import actor_model, check_family, export_policy, resolve_model
from ekipl.tasks.scorer import RewardFunctionError

log = logging.getLogger("ekipl.train")


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


class Trainer:
    """One run: :meth:`setup` (data, models, Ray actors, resume), :meth:`step` per step (the EKIPL
    step, validation, logging, checkpoint), :meth:`export`, and :meth:`close`, which always runs, so
    no actor outlives the run even when start-up fails half way."""

    def __init__(self, cfg, hooks: Hooks | None = None):
        self.hooks = hooks or Hooks()
        self.tree = config_tree(cfg)
        self.cfg, self.source_cfgs = to_run_config(self.tree)
        self.out = Path(self.cfg.trainer.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.router = self.learner = self.coord = self.metrics_log = self.validator = self.scorer = None
        self.placement = None
        self.sources: list = []
        self.started_ray = False
        self.summary = {"steps": 0, "skipped_steps": 0, "start_step": 0}
        self.state = {"consecutive_skips": 0, "wandb_id": None}

    def run(self) -> dict:
        try:
            self.setup()
            self.loop()
            self.export()
        finally:
            self.close()
        return self.summary

    # ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from ekipl.validation import Validator

        run_cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        resume = find_resume(run_cfg, self.ckpt_root)
        if resume is not None:
            _check_compatible(run_cfg, resume[1])
        (out / "config.json").write_text(json.dumps(redact(self.tree), indent=1, default=str))
        torch.manual_seed(run_cfg.trainer.seed)
        random.seed(run_cfg.trainer.seed)
        self.scorer = run_cfg.reward.scorer()  # a bad reward.function fails here, naming the key
        m = run_cfg.model
        # The driver's copy of each model's files (config, tokenizer, processor), and what the
        # actors get: a HF id stays an id, resolved on the node that runs it.
        self.model_path = resolve_model(m.path, m.seed, "model.path", m.cache_dir)
        self.model_ref = actor_model(m.path, self.model_path)
        check_family(self.model_path, "model.path")
        self.aux_files = {
            s.name: resolve_model(s.model, m.seed, f"aux.{s.name}.model", m.cache_dir)
            for s in self.source_cfgs
            if s.kind in ("vllm", "hf")
        }
        self.source_cfgs = [self._source_for_actors(s) for s in self.source_cfgs]
        from ekipl.models import hf

        self.processor = hf.load_processor(self.model_path, m.min_pixels, m.max_pixels)
        self.data = drop_overlong(
            load_data(run_cfg, out, self.scorer.tasks), self.processor, run_cfg, "train"
        )
        try:  # one call of a reward.function on a real row, before anything starts
            self.scorer.probe(self.data[0])
        except RewardFunctionError as e:
            raise ConfigError(str(e)) from None
        self.validator = Validator.from_config(
            run_cfg, out, self.processor, self.scorer
        )  # bad splits fail here
        self.started_ray = init_ray(run_cfg)
        self._start_actors()
        self.sampler = Sampler(len(self.data), run_cfg.trainer.seed, run_cfg.data.shuffle)
        self.images = ImageCheck(run_cfg.data.skip_bad_rows)
        if resume is not None:
            self._resume(*resume)
        self.metrics_log = MetricsLog(
            run_cfg.logger,
            out,
            redact(self.tree),
            resume_step=self.summary["start_step"],
            wandb_id=self.state["wandb_id"],
        )
        self.parts = StepParts(
            self.cfg,
            self.data,
            self.sampler,
            self.images,
            self.coord,
            self.learner,
            self.router,
            self.processor,
            self.hooks,
        )
        self.ctx = {
            "router": self.router,
            "sources": self.sources,
            "learner": self.learner,
            "coordinator": self.coord,
        }

    def _source_for_actors(self, s):
        """``s`` with the model its backend gets: an hf source's runs here (the driver's directory), a
        vllm source's engines get :func:`actor_model`'s reference."""
        if s.name not in self.aux_files:
            return s
        files = self.aux_files[s.name]
        return dataclasses.replace(s, model=files if s.kind == "hf" else actor_model(s.model, files))

    def _start_actors(self) -> None:

        from ekipl.engines import vllm_backend as vb
        from ekipl.learner.group import LearnerGroup
        from ekipl.placement import Placement, write_placement
        from ekipl.plan import check as check_plan
        from ekipl.rollout.cache import ActionCache
        from ekipl.rollout.coordinator import RolloutCoordinator
        from ekipl.rollout.policy import PolicyRouter
        from ekipl.rollout.sources import make_source

        run_cfg, m = self.cfg, self.cfg.model
        t0 = time.perf_counter()
        # The plan first (ekipl plan's check: placement, and GPU memory on a GPU cluster), then the
        # placement groups: a run that cannot fit is refused here, naming the key, before any actor.
        check_plan(run_cfg, self.source_cfgs)
        self.placement = Placement(run_cfg, self.source_cfgs)
        spec = vb.engine_spec(m, self.model_ref, m.seed, cache_dir=m.cache_dir)
        # On CPU, the policy and aux engines generate at the same time (prefetch): they split the
        # cores; with one-step-off rollout the learner's update runs beside them too and takes a share.
        engines = m.engine_replicas + sum(s.replicas for s in self.source_cfgs if s.kind == "vllm")
        engines += int(run_cfg.rollout.ahead > 0)
        self.router = PolicyRouter(
            spec,
            replicas=m.engine_replicas,
            num_cpus=m.engine_num_cpus,
            num_gpus=m.engine_num_gpus,
            resources=m.engine_resources,
            engine_share=engines,
            placement=self.placement,
        )
        seed = run_cfg.trainer.seed
        self.sources = [
            make_source(
                s,
                seed=seed,
                engine_share=engines,
                **(
                    dict(files=self.aux_files[s.name], cache_dir=m.cache_dir, placement=self.placement)
                    if s.kind == "vllm"
                    else {}
                ),
            )
            for s in self.source_cfgs
        ]
        self.learner = LearnerGroup(
            self.model_ref,
            run_cfg.learner,
            run_cfg.algorithm,
            seed=seed,
            placement=self.placement,
            resources=run_cfg.learner.resources,
            cache_dir=m.cache_dir,
        )
        self.router.ready()
        for s in self.sources:
            if hasattr(s, "ready"):
                s.ready()
        self.learner.ready()
        log.info("engines and learners up in %.1fs", time.perf_counter() - t0)
        write_placement(self.out / "placement.json", self.placement, self.router, self.sources, self.learner)
        self.cache = ActionCache(self.out / "aux_cache") if run_cfg.trainer.aux_cache else None
        self.coord = RolloutCoordinator(
            run_cfg.rollout, self.router, self.sources, self.processor, self.scorer, self.cache
        )

    def _resume(self, path: Path, saved: dict) -> None:
        t1 = time.perf_counter()
        self.learner.load_checkpoint(str(path / "learner"))
        self.sampler.position = saved["sampler_position"]
        ckpt.set_rng_state(saved["rng"])
        self.summary.update(steps=saved["steps_done"], skipped_steps=saved["skipped_steps"])
        self.state.update(consecutive_skips=saved["consecutive_skips"], wandb_id=saved.get("wandb_id"))
        if self.cfg.rollout.ahead:
            self.coord.restore_early(saved.get("early_rollout"))
        self.coord.restore_gate(saved.get("gate_pass_rates"))
        self.summary["start_step"] = saved["step"]
        if self.cache is not None:
            missing = [k for k in saved.get("aux_cache_keys", []) if self.cache.get(k) is None]
            if missing:
                log.warning(
                    "resume: %d aux cache entries of the checkpoint are gone (regenerated)", len(missing)
                )
        self.learner.sync_weights(self.router.actors)  # the engines started from the base weights
        log.info("resumed from %s (step %d) in %.1fs", path, saved["step"], time.perf_counter() - t1)

    # ------------------------------------------------------------------------------------------
    def loop(self) -> None:
        from tqdm import tqdm

        from ekipl.learner.group import LearnerError
        from ekipl.rollout.policy import PolicyEngineError

        first, last = self.summary["start_step"] + 1, self.cfg.trainer.steps
        try:
            if first == 1 and self.cfg.trainer.eval_before_train:
                self.metrics_log.log(0, self.validate(0))
            for step in tqdm(
                range(first, last + 1), desc="ekipl", initial=first - 1, total=last, disable=None
            ):
                self.step(step)
        except (LearnerError, PolicyEngineError) as e:
            found = ckpt.latest(self.ckpt_root)
            where = (
                f"the last checkpoint is {found[0]} (step {found[1]['step']}); continue with "
                "trainer.resume=auto"
                if found
                else "there is no checkpoint to resume from yet"
                + ("" if self.cfg.trainer.save_every else " (trainer.save_every=0 writes none)")
            )
            raise TrainingError(f"{e}; {where}") from e

    def step(self, step: int) -> dict:
        """One step: the EKIPL step, then validation and samples when due, log, checkpoint, hooks."""
        t, summary, state = self.cfg.trainer, self.summary, self.state
        record: dict = {}
        m = self.parts.run(step, record)
        skipped = m.get("trainer/skipped_step", 0.0) > 0
        summary["skipped_steps" if skipped else "steps"] += 1
        state["consecutive_skips"] = state["consecutive_skips"] + 1 if m.get("actor/skipped_step") else 0
        m["trainer/consecutive_nonfinite_skips"] = float(state["consecutive_skips"])
        m.update(self.scorer.metrics())  # reward/errors: calls that raised, hung or returned a non-number
        m["data/overlong_prompts"] = float(self.data.report.overlong)
        if t.eval_every and step % t.eval_every == 0:
            m.update(self.validate(step))
        if t.log_samples_every and step % t.log_samples_every == 0 and record:
            self.metrics_log.log_samples(
                step, sample_rows(record, self.coord.last_candidates, t.log_samples_groups)
            )
        self.metrics_log.log(step, m)
        summary["last"] = m
        if t.save_every and (step % t.save_every == 0 or step == t.steps):
            self.save(step)
        if self.hooks.after_step is not None:
            self.hooks.after_step(step, self.ctx)
        if state["consecutive_skips"] >= t.max_nonfinite_skips:
            raise TrainingError(
                f"{state['consecutive_skips']} consecutive steps had a non-finite loss or gradient "
                f"and were skipped (trainer.max_nonfinite_skips={t.max_nonfinite_skips}); the weights "
                "are those of the last good step. Lower learner.lr or check the rewards and data."
            )
        return m

    def validate(self, step: int) -> dict:
        """Held-out splits through the policy engines (``val/<split>/...``). A failure is logged and
        counted (``val/failed``), never raised: validation must not stop a run."""
        try:
            return self.validator.run(self.router, step)
        except Exception as e:  # noqa: BLE001 -- whatever broke, training goes on
            log.warning("step %d: validation failed (%s: %s); training goes on", step, type(e).__name__, e)
            return {"val/failed": 1.0}

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        coord, cache, sampler, run_cfg = self.coord, self.cache, self.sampler, self.cfg
        coord.drain()  # prefetched aux actions land in the cache first, so the index below is complete
        driver_state = {
            "sampler_position": sampler.position,
            "rng": ckpt.rng_state(),
            "steps_done": self.summary["steps"],
            "skipped_steps": self.summary["skipped_steps"],
            "consecutive_skips": self.state["consecutive_skips"],
            "wandb_id": self.metrics_log.run_id,
            "aux_cache_keys": cache.keys() if cache is not None else [],
            "early_rollout": coord.early_state(),  # rollouts ahead: the next steps' actions, already sampled
            "gate_pass_rates": coord.gate_state(),  # rollout.gate_prefetch's memory of the last visits
            "world_size": run_cfg.learner.world_size,
            "zero_stage": run_cfg.learner.zero_stage,
            "dataset_size": sampler.n,
        }
        path = ckpt.save(
            self.ckpt_root,
            step,
            lambda d: self.learner.save_checkpoint(str(d)),
            driver_state,
            keep=run_cfg.trainer.keep_checkpoints,
        )
        log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - t0)

    def export(self) -> None:
        export = self.out / "policy"
        export_policy(self.learner, self.model_path, export)
        self.summary["export"] = str(export)

    def close(self) -> None:
        import ray

        if self.metrics_log is not None:
            self.metrics_log.close()
        if self.coord is not None:
            self.coord.shutdown()
        else:
            for src in self.sources:
                src.shutdown()
        if self.learner is not None:
            self.learner.shutdown()
        for actor in self.router.actors if self.router is not None else []:
            ray.kill(actor)
        if self.placement is not None:
            self.placement.remove()
        if self.scorer is not None:
            self.scorer.close()
        if self.started_ray:
            ray.shutdown()


def run(cfg, hooks: Hooks | None = None) -> dict:
    """Run training from a Hydra DictConfig (or a plain dict). Returns a summary."""
    return Trainer(cfg, hooks).run()


def sample_rows(record: dict, candidates, n_groups: int) -> list[dict]:
    """Rows of the first ``n_groups`` prompts' candidates for reading what the model says: source,
    completion, reward, whether it was selected, and its advantage when it was."""
    adv = {id(a): float(v) for a, v in zip(record["actions"], record["advantages"], strict=True)}
    rows = []
    for sample, acts in (candidates or [])[:n_groups]:
        for a in acts:
            rows.append(
                {
                    "sample": sample.id,
                    "answer": sample.answer,
                    "source": a.source,
                    "completion": a.text,
                    "tokens": len(a.token_ids),
                    "reward": a.reward,
                    "accuracy": a.accuracy,
                    "format": a.format,
                    "selected": id(a) in adv,
                    "advantage": adv.get(id(a)),
                }
            )
    return rows


@dataclasses.dataclass
class StepParts:
    """What one EKIPL step works with: the run's config and data, the sampler and the image check,
    the rollout coordinator, the learner group, the policy router, the processor and the test hooks.
    The :class:`Trainer` builds one in its setup; benchmarks and tests build one from their own
    actors and call :meth:`run` as the trainer does."""

    cfg: RunConfig
    data: object
    sampler: Sampler
    images: ImageCheck
    coord: object
    learner: object
    router: object
    processor: object
    hooks: Hooks = dataclasses.field(default_factory=Hooks)

    def _batch(self, advance: bool = True) -> list:
        k = self.cfg.data.prompts_per_step
        return self.images.filter([self.data[i] for i in self.sampler.take(k, advance=advance)])

    def _peek(self, j: int) -> list:
        """The batch ``j`` steps ahead of the one just taken (1: the next one), without moving the
        sampler."""
        k = self.cfg.data.prompts_per_step
        idx = self.sampler.take(k * j, advance=False)[k * (j - 1) :]
        return self.images.filter([self.data[i] for i in idx])

    def _start_ahead(self, step: int) -> None:
        """Rollouts ahead of the update (``rollout.max_staleness``, ``one_step_off``): the policy's
        generation for each of the next N steps' batches that is not yet running starts now, with
        these weights, while the learner updates."""
        for j in range(1, self.cfg.rollout.ahead + 1):
            if not self.coord.early.has(step + j) and (batch := self._peek(j)):
                self.coord.start_early(batch, step + j)

    def _more(self) -> list:
        """Dynamic sampling's next round: the next batch (the one just prefetched), then prefetch."""
        batch = self._batch()
        self.coord.prefetch(self._batch(advance=False))
        return batch

    def run(self, step: int, record: dict | None = None) -> dict:
        """One EKIPL step: rollout (aux prefetched ahead) -> advantages -> update -> weight sync.
        ``record``, a dict, receives the selected actions and their advantages."""
        ts = time.perf_counter()
        samples, upcoming = self._batch(), self._batch(advance=False)  # this batch and the next
        self.coord.prefetch(upcoming)
        if not samples:
            log.warning("step %d: every sample of the batch had a bad image; skipped", step)
            return {"trainer/skipped_step": 1.0, "data/bad_rows_skipped": float(len(self.images.bad))}
        more = self._more if self.cfg.rollout.dynamic_sampling else None
        groups, m = self.coord.rollout(samples, step=step, more=more)
        self._start_ahead(step)

        m["data/bad_rows_skipped"] = float(len(self.images.bad))
        if sum(len(g.actions) for g in groups) < self.cfg.learner.world_size:
            m["trainer/skipped_step"] = 1.0
            log.warning(
                "step %d: after dropping tied groups, fewer actions than learner ranks; skipped", step
            )
            return m
        m.update(self._update(step, groups, record))
        m["timing/step"] = time.perf_counter() - ts
        m["perf/policy_tokens_per_s"] = m["rollout/policy_tokens"] / max(m["timing/rollout"], 1e-9)
        return m

    def _update(self, step: int, groups: list, record: dict | None) -> dict:
        """Advantages, the learner's update and the weight sync for the step's groups."""
        from ekipl.algo.objective import group_advantages
        from ekipl.learner.batch import collate

        actions = [a for g in groups for a in g.actions]
        rewards = torch.tensor([a.reward for a in actions])
        gidx = torch.tensor([i for i, g in enumerate(groups) for _ in g.actions])
        is_pol = torch.tensor([a.is_policy for a in actions])
        correct = torch.tensor([a.accuracy >= 1.0 - 1e-9 for a in actions])
        alg = self.cfg.algorithm
        adv = group_advantages(rewards, gidx, is_pol, alg.advantage, alg.eps, alg.std, correct)
        if record is not None:
            record.update(actions=actions, advantages=adv.tolist())
        batch = collate(groups, self.processor, adv)
        if self.hooks.before_update is not None:
            self.hooks.before_update(step, batch)
        m = self.learner.train_step(batch)
        if m.get("actor/skipped_step"):
            # The weights did not change, so the engines are already in sync: nothing non-finite
            # ever reaches them.
            log.warning("step %d: non-finite loss or gradient; the optimizer step was skipped", step)
            m["timing/weight_sync"] = 0.0
        else:
            m.update(self.learner.sync_weights(self.router.actors))
        return m


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


def main() -> None:
    hydra_main(run)


if __name__ == "__main__":
    main()
