"""``Gate``: guidance only where the policy needs it (``rollout.gate_threshold``,
``rollout.aux_on_demand``), its latency hidden by ``rollout.gate_prefetch``.

After the policy's samples of a batch are scored, the prompts whose pass rate calls for guidance
(:meth:`~ekipl.rollout.config.RolloutConfig.needs_guidance`) get auxiliary actions, every source at
once. With ``gate_prefetch`` the gate remembers each prompt's pass rate at its last visit and, at a
batch's prefetch, starts the requests for the prompts that needed guidance then; a prompt that needs
it now and was not started is asked on demand, and answers started for a prompt that no longer needs
them are let go (counted ``unused``). Its memory goes into checkpoints (:meth:`state`).
"""

from __future__ import annotations

from concurrent.futures import Future

from ekipl.rollout.auxiliary import AuxFetcher
from ekipl.rollout.config import RolloutConfig
from ekipl.tasks.sample import Sample


class Gate:
    def __init__(self, cfg: RolloutConfig, fetcher: AuxFetcher):
        self.cfg, self.fetcher = cfg, fetcher
        self._last_pass: dict[str, float] = {}  # sample id -> its policy pass rate at the last visit
        self._started: dict[tuple[str, str], tuple[Future, int]] = {}  # (source, sample id)
        self.counts = {"prefetched": 0, "on_demand": 0, "unused": 0}

    def prefetch(self, samples: list[Sample]) -> None:
        """Start the requests for the prompts that needed guidance at their last visit."""
        sources = self.fetcher.sources
        likely = [
            s
            for s in samples
            if s.id in self._last_pass
            and self.cfg.needs_guidance(self._last_pass[s.id])
            and not any((src.name, s.id) in self._started for src in sources)
        ]
        if likely:
            for src in sources:
                fut = self.fetcher.submit(src, likely)
                for j, s in enumerate(likely):
                    self._started[(src.name, s.id)] = (fut, j)

    def pending(self) -> bool:
        return bool(self._started)

    def guidance(self, samples: list[Sample], need: list[int]) -> list[tuple[str, list[int], list]]:
        """Auxiliary texts for ``samples[i]``, ``i`` in ``need``: those started at the prefetch are
        taken, the rest are asked now, every source at once. Started answers of the other samples are
        let go (counted ``unused``)."""
        wanted = {samples[i].id for i in need}
        plans = []
        for src in self.fetcher.sources:
            held = {
                s.id: self._started.pop((src.name, s.id))
                for s in samples
                if (src.name, s.id) in self._started
            }
            self.counts["unused"] += sum(sid not in wanted for sid in held)
            rest = [samples[i] for i in need if samples[i].id not in held]
            plans.append((src, held, rest, self.fetcher.submit(src, rest) if rest else None))
        out = []
        for src, held, rest, fut in plans:
            fresh = iter(fut.result() if fut is not None else [])
            texts = []
            for i in need:
                sid = samples[i].id
                texts.append(held[sid][0].result()[held[sid][1]] if sid in held else next(fresh))
            self.counts["prefetched"] += len(need) - len(rest)
            self.counts["on_demand"] += len(rest)
            out.append((src.name, need, texts))
        return out

    def remember(self, pass_rates: dict[str, float]) -> None:
        """Each prompt's policy pass rate at this visit (``gate_prefetch``'s memory)."""
        if self.cfg.gate_prefetch:
            self._last_pass.update(pass_rates)

    def metrics(self) -> dict[str, float]:
        """Cumulative: guided prompts served early / asked late, answers let go."""
        return {f"aux/gate_{k}": float(v) for k, v in self.counts.items()} if self.cfg.gate_prefetch else {}

    def state(self) -> dict[str, float]:
        """The memory, for a checkpoint: a resumed run starts the same requests early."""
        return dict(self._last_pass)

    def restore(self, state: dict[str, float] | None) -> None:
        self._last_pass = dict(state or {})
