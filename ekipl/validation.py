"""Validation inside the training loop (``trainer.eval_every``, ``trainer.eval_before_train``).

The held-out splits go through the policy engines that are already up, with the weights of the
step just synced, and are scored exactly as ``ekipl.eval`` scores them (:func:`ekipl.eval.score_split`:
greedy accuracy and format; pass@1 and pass@k from ``trainer.eval_k`` samples). Metrics are
``val/<split>/<metric>``; each validation's completions go to ``<output_dir>/val/step_NNNNNN.<split>.jsonl``.
"""

from __future__ import annotations

import time
from pathlib import Path

from ekipl.eval import score_split, split_requests, write_records


class Validator:
    def __init__(
        self,
        splits: dict[str, list],
        processor,
        k: int,
        temperature: float,
        max_tokens: int,
        scorer,
        out_dir: Path | None,
        system_prompt: bool = False,
    ):
        self.splits, self.processor, self.system_prompt = splits, processor, system_prompt
        self.k, self.temperature, self.max_tokens = k, temperature, max_tokens
        self.scorer, self.out_dir = scorer, out_dir
        self._requests: dict[str, list] = {}

    @classmethod
    def from_config(cls, run, out: Path, processor, scorer) -> Validator | None:
        """The run's validator, or None when validation is off. Bad split files raise DataError;
        prompts too long for the model are dropped or refused as the training data's are."""
        from ekipl.data import drop_overlong, load_split

        t, d = run.trainer, run.data
        if not (t.eval_every or t.eval_before_train):
            return None
        files = dict(d.val_files)
        if not files:  # the synthetic data's held-out splits (ekipl.data.load_data wrote them)
            root = out / "data" / d.synthetic_task
            files = {"id": str(root / "test_id.json"), "ood": str(root / "test_ood.json")}
        splits = {}
        for name, path in files.items():
            ds = load_split(run, path, out, scorer.tasks, skip_bad_rows=False)
            splits[name] = list(drop_overlong(ds, processor, run, f"data.val_files.{name}"))[
                : t.eval_limit or None
            ]
        return cls(
            splits,
            processor,
            k=t.eval_k,
            temperature=t.eval_temperature,
            max_tokens=t.eval_max_tokens or run.rollout.max_tokens,
            scorer=scorer,
            out_dir=out / "val",
            system_prompt=run.rollout.system_prompt,  # the prompt the policy trains on
        )

    def requests(self, name: str) -> list:
        """A split's engine requests, rendered as training renders its prompts (images decoded once
        per run)."""
        if name not in self._requests:
            self._requests[name] = split_requests(self.processor, self.splits[name], self.system_prompt)
        return self._requests[name]

    def run(self, router, step: int) -> dict:
        """Every split through ``router`` (a :class:`~ekipl.rollout.policy.PolicyRouter`)."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for name, samples in self.splits.items():
            requests = self.requests(name)
            greedy = [
                c.text for (c,) in router.generate(requests, n=1, temperature=0.0, max_tokens=self.max_tokens)
            ]
            sampled = []
            if self.k:
                groups = router.generate(
                    requests, n=self.k, temperature=self.temperature, max_tokens=self.max_tokens, seed=step
                )
                sampled = [[c.text for c in g] for g in groups]
            metrics, records = score_split(samples, greedy, sampled, self.k or 1, self.scorer)
            out.update({f"val/{name}/{k}": float(v) for k, v in metrics.items()})
            if self.out_dir is not None:
                write_records(records, self.out_dir / f"step_{step:06d}.{name}.jsonl")
        out["timing/validation"] = time.perf_counter() - t0
        return out
