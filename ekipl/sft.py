"""``python -m ekipl.sft``: Reason-RFT's stage 1, CoT-SFT on the recorded ``cot`` traces.

The same configs as ``ekipl.train`` (model, data, learner, trainer, logger; ``aux``, ``rollout``
and ``algorithm`` are not used) and the same learner code: DeepSpeed ZeRO ranks in Ray actors,
with the negative log-likelihood of each trace as the loss (``objective.sft_loss``). Each step
takes ``data.prompts_per_step`` rows that have a ``cot``; rows without one are counted and left out.
The result is exported in ``save_pretrained``'s layout to ``<output_dir>/policy``, ready to be the
RL stage's ``model.path``::

    python -m ekipl.sft +experiment=counting_2b trainer.steps=300 trainer.output_dir=outputs/sft
    python -m ekipl.train +experiment=counting_2b model.path=outputs/sft/policy
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ekipl.config import ConfigError, to_run_config
from ekipl.metrics import MetricsLog, redact
from ekipl.tasks.sample import DataError

log = logging.getLogger("ekipl.sft")


def sft_groups(samples, processor, max_tokens: int, system_prompt: bool = False):
    """One group per sample whose only action is its recorded trace, in the policy's tokens, after
    the prompt as RL renders it (``rollout.system_prompt``)."""
    from ekipl.rollout.coordinator import text_token_ids
    from ekipl.tasks.prompts import render_prompt
    from ekipl.types import Action, Group

    tok = getattr(processor, "tokenizer", processor)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    groups = []
    for s in samples:
        ids, text = text_token_ids(tok, s.cot, eos, max_tokens)
        groups.append(
            Group(
                sample=s,
                prompt=render_prompt(processor, s, system_prompt),
                actions=[Action("cot", ids, text)],
            )
        )
    return groups


def run(cfg) -> dict:
    import ray

    from ekipl.algo.objective import ObjectiveConfig
    from ekipl.cluster import config_tree, init_ray
    from ekipl.data import ImageCheck, Sampler, load_data
    from ekipl.learner.batch import collate
    from ekipl.learner.group import LearnerGroup
    from ekipl.modelref import check_family, export_policy, resolve_model
    from ekipl.models import hf

    tree = config_tree(cfg)
    tree["aux"] = {}  # SFT has no auxiliary sources
    run_cfg, _ = to_run_config(tree)
    out = Path(run_cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(redact(tree), indent=1, default=str))
    torch.manual_seed(run_cfg.trainer.seed)

    data = load_data(run_cfg, out, tasks=None)  # SFT scores nothing: any task name trains
    usable = [i for i in range(len(data)) if data[i].cot]
    if not usable:
        raise DataError(
            f"no row has a 'cot' trace to fine-tune on ({len(data)} rows)", file=run_cfg.data.train_file
        )
    if len(usable) < len(data):
        log.warning("%d of %d rows have no 'cot' and are left out of SFT", len(data) - len(usable), len(data))
    if run_cfg.data.prompts_per_step < run_cfg.learner.world_size:
        raise ConfigError(
            f"data.prompts_per_step: {run_cfg.data.prompts_per_step} traces per step cannot feed "
            f"learner.world_size={run_cfg.learner.world_size} ranks"
        )
    m = run_cfg.model
    model_path = resolve_model(m.path, m.seed, "model.path")
    check_family(model_path, "model.path")
    processor = hf.load_processor(model_path, m.min_pixels, m.max_pixels)

    started_ray = init_ray(run_cfg)
    learner = metrics_log = None
    summary: dict = {"steps": 0}
    try:
        learner = LearnerGroup(
            model_path, run_cfg.learner, ObjectiveConfig(kl_coef=0.0), seed=run_cfg.trainer.seed
        )
        learner.ready()
        metrics_log = MetricsLog(run_cfg.logger, out, redact(tree))
        sampler = Sampler(len(usable), run_cfg.trainer.seed, run_cfg.data.shuffle)
        images = ImageCheck(run_cfg.data.skip_bad_rows)
        from tqdm import tqdm

        for step in tqdm(range(1, run_cfg.trainer.steps + 1), desc="ekipl sft", disable=None):
            ts = time.perf_counter()
            samples = images.filter([data[usable[i]] for i in sampler.take(run_cfg.data.prompts_per_step)])
            if len(samples) < run_cfg.learner.world_size:
                log.warning("step %d: too few usable rows after bad images; skipped", step)
                continue
            groups = sft_groups(
                samples, processor, run_cfg.rollout.aux_max_tokens, run_cfg.rollout.system_prompt
            )
            batch = collate(groups, processor, torch.zeros(len(groups)))
            m = learner.train_step(batch, sft=True)
            m["timing/step"] = time.perf_counter() - ts
            m["sft/tokens"] = float(batch.completion_mask.sum())
            metrics_log.log(step, m)
            summary["steps"] += 1
            summary["last"] = m
        export_policy(learner, model_path, out / "policy")
        summary["export"] = str(out / "policy")
    finally:
        if metrics_log is not None:
            metrics_log.close()
        if learner is not None:
            learner.shutdown()
        if started_ray:
            ray.shutdown()
    return summary


def main() -> None:
    from ekipl.cluster import hydra_main

    hydra_main(run)


if __name__ == "__main__":
    main()
