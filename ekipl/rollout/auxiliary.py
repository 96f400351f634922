"""``AuxFetcher``: the auxiliary sources behind one door.

Each source's texts for a batch go through the content-addressed action cache (a cached answer costs
nothing) in a thread pool: started at the prefetch for a coming batch, or asked now. A source that
fails is logged, restarted and counted (``aux/failures``), and the batch gets no actions from it
this time; it never raises. What guidance costs is counted here: completions asked of each source
(prompts x k) and the tokens they returned, in the policy's tokens.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ekipl.rollout.cache import ActionCache, cache_key
from ekipl.rollout.sources import Source
from ekipl.tasks.sample import Sample

log = logging.getLogger("ekipl.rollout.coordinator")


class AuxFetcher:
    def __init__(self, sources: list[Source], tokenizer, cache: ActionCache | None = None):
        self.sources, self.tokenizer, self.cache = sources, tokenizer, cache
        self.pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(sources) + 1))
        self._pending: dict[tuple[str, tuple[str, ...]], Future] = {}
        self.failures: dict[str, int] = {s.name: 0 for s in sources}
        self.costs: dict[str, dict[str, int]] = {s.name: {"requests": 0, "tokens": 0} for s in sources}
        self._cost_lock = threading.Lock()

    def fetch(self, source: Source, samples: list[Sample]) -> list[list[str]]:
        """Texts per sample from one source, through the cache. Never raises: a failure is logged,
        the source is restarted, and the samples get no actions from it this time."""
        keys: list[str | None] = [None] * len(samples)
        out: list[list[str] | None] = [None] * len(samples)
        if self.cache is not None and source.cacheable:
            for i, s in enumerate(samples):
                keys[i] = cache_key(
                    source.model_id, source.prompt_text(s), list(s.image_paths), source.cfg.sampling()
                )
                out[i] = self.cache.get(keys[i])
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            texts = self._generate(source, [samples[i] for i in todo])
            if texts is not None and self.cache is not None and source.cacheable:
                for i, t in zip(todo, texts, strict=True):
                    if t:
                        self.cache.put(keys[i], t, {"source": source.name, "sample": samples[i].id})
            for i, t in zip(todo, texts or [[] for _ in todo], strict=True):
                out[i] = t
        return [o or [] for o in out]

    def _generate(self, source: Source, samples: list[Sample]) -> list[list[str]] | None:
        """The source's texts, counted; None when it failed (logged, restarted, counted)."""
        try:
            texts = source.generate(samples)
        except Exception as e:  # a dead or hung actor, an unreachable endpoint
            self.failures[source.name] += 1
            log.warning(
                "aux source %r failed (%s: %s); building groups from the remaining sources and restarting it",
                source.name,
                type(e).__name__,
                (str(e).splitlines() or [""])[0][:200],
            )
            try:
                source.restart(e)
            except Exception as e2:
                log.warning("aux source %r: restart failed: %s", source.name, e2)
            return None
        self._count(source, len(samples), texts)
        return texts

    def submit(self, source: Source, samples: list[Sample]) -> Future:
        """:meth:`fetch` in the pool."""
        return self.pool.submit(self.fetch, source, samples)

    def prefetch(self, samples: list[Sample]) -> None:
        """Start every source on a coming batch; :meth:`future` takes the result."""
        ids = tuple(s.id for s in samples)
        for src in self.sources:
            key = (src.name, ids)
            if key not in self._pending:
                self._pending[key] = self.submit(src, samples)

    def future(self, source: Source, samples: list[Sample]) -> Future:
        """The batch's prefetched work for ``source``, or the same started now."""
        return self._pending.pop((source.name, tuple(s.id for s in samples)), None) or self.submit(
            source, samples
        )

    def _count(self, source: Source, prompts: int, texts: list[list[str]]) -> None:
        """What guidance cost: completions asked of ``source`` (prompts x k; cache hits cost nothing)
        and the tokens it returned, in the policy's tokens (an API bills in its own: an estimate)."""
        tokens = sum(
            len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for ts in texts for t in ts
        )
        with self._cost_lock:
            c = self.costs[source.name]
            c["requests"] += prompts * source.cfg.k
            c["tokens"] += tokens

    def cost_metrics(self) -> dict[str, float]:
        """Cumulative ``aux/requests|tokens|cost_usd/<source>`` and their totals (``aux/*_total``);
        the cost is ``aux.NAME.price_per_1k_tokens`` x tokens / 1000."""
        m: dict[str, float] = {}
        with self._cost_lock:
            for s in self.sources:
                c = self.costs[s.name]
                m[f"aux/requests/{s.name}"] = float(c["requests"])
                m[f"aux/tokens/{s.name}"] = float(c["tokens"])
                m[f"aux/cost_usd/{s.name}"] = c["tokens"] / 1000.0 * s.cfg.price_per_1k_tokens
        for key in ("requests", "tokens", "cost_usd"):
            m[f"aux/{key}_total"] = sum(v for k, v in m.items() if k.startswith(f"aux/{key}/"))
        return m

    def drain(self) -> None:
        """Wait for prefetched work to land in the cache (before a checkpoint)."""
        for f in list(self._pending.values()):
            f.result()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for s in self.sources:
            s.shutdown()
