"""Policy engine replicas behind a least-loaded router."""

from __future__ import annotations

import dataclasses
import threading

from ekipl.engines import vllm_backend as vb
from ekipl.engines.policy import PolicyEngineError


class PolicyRouter:
    """Sends each request batch to the replica with the fewest requests in flight."""

    def __init__(
        self,
        spec: vb.EngineSpec,
        replicas: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        resources: dict | None = None,
        actors: list | None = None,
        engine_share: int | None = None,
        placement=None,
    ):
        """``engine_share``: engines of the run generating at once on one CPU machine (default: the
        replicas); they split its cores. Ignored on GPU. ``placement``: the run's
        :class:`~ekipl.placement.Placement` (None: Ray places the actors by their resources)."""
        from ekipl.engines.policy import start_engine_actor

        if actors is None:
            actors = [
                start_engine_actor(
                    dataclasses.replace(spec, enable_weight_sync=True),
                    f"policy/{r}",
                    num_cpus,
                    num_gpus,
                    resources,
                    engine_share or replicas,
                    placement,
                    max_restarts=0,
                )
                for r in range(replicas)
            ]
        self.actors = actors
        self.in_flight = [0] * len(actors)
        self._lock = threading.Lock()

    def ready(self):
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    def _pick(self, weight: int) -> int:
        with self._lock:
            i = min(range(len(self.actors)), key=lambda j: (self.in_flight[j], j))
            self.in_flight[i] += weight
            return i

    def submit(
        self,
        requests: list[vb.Request],
        n: int,
        temperature: float,
        max_tokens: int | list[int],
        seed: int | None = None,
        chunk: int | None = None,
        ignore_eos: bool = False,
    ) -> PendingGeneration:
        """Start generating for all requests, split in chunks over the replicas (least loaded first);
        returns at once. Each replica runs its calls in order, so a weight sync issued after this
        waits for it: the completions come from the weights the engines had when it was called.
        ``max_tokens``: one limit, or one per request."""
        limits = vb.per_request(max_tokens, len(requests), "max_tokens")
        chunk = chunk or max(1, -(-len(requests) // len(self.actors)))
        starts = range(0, len(requests), chunk)
        parts = [requests[i : i + chunk] for i in starts]
        picks = [self._pick(len(p)) for p in parts]
        refs = [
            self.actors[i].generate.remote(
                p,
                n=n,
                temperature=temperature,
                max_tokens=limits[s : s + chunk],
                seed=None if seed is None else seed + k,
                ignore_eos=ignore_eos,
            )
            for k, (i, s, p) in enumerate(zip(picks, starts, parts, strict=True))
        ]
        return PendingGeneration(self, refs, [(i, len(p)) for i, p in zip(picks, parts, strict=True)])

    def generate(self, requests: list[vb.Request], n: int, temperature: float, max_tokens: int, **kw):
        """:meth:`submit`, then wait: the completions of each request, in order."""
        return self.submit(requests, n, temperature, max_tokens, **kw).result()

    def _done(self, loads: list[tuple[int, int]]) -> None:
        with self._lock:
            for i, weight in loads:
                self.in_flight[i] -= weight


class PendingGeneration:
    """Generation in flight on the policy replicas; :meth:`result` waits for it (once)."""

    def __init__(self, router: PolicyRouter, refs: list, loads: list[tuple[int, int]]):
        self._router, self._refs, self._loads = router, refs, loads
        self._out: list[list[vb.Completion]] | None = None

    def result(self) -> list[list[vb.Completion]]:
        import ray

        if self._out is None:
            try:
                outs = ray.get(self._refs)
            except ray.exceptions.RayActorError as e:
                raise PolicyEngineError(f"a policy engine replica died: {e}") from e
            except ray.exceptions.RayTaskError as e:
                raise PolicyEngineError(f"policy generation failed: {e}") from e
            finally:
                if self._loads:
                    self._router._done(self._loads)
                    self._loads = []
            self._out = [g for out in outs for g in out]
        return self._out
