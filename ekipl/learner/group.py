"""``LearnerGroup``: N Ray actors forming one torch.distributed group (gloo on CPU, NCCL on GPU).

The driver-side handle shards each batch by rows across ranks, runs the three passes (old and
reference log-probs, then μ epochs of updates) and pushes the new weights to policy engines.
"""

from __future__ import annotations

import logging
import time

import torch

from ekipl.algo.objective import ObjectiveConfig
from ekipl.learner.batch import Batch
from ekipl.learner.config import LearnerConfig
from ekipl.learner.worker import Learner, plan_rows

log = logging.getLogger(__name__)


def shard_rows(n: int, world: int) -> list[list[int]]:
    """Contiguous, near-equal row ranges per rank (rank r gets rows r*k .. )."""
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        k = base + (1 if r < extra else 0)
        out.append(list(range(start, start + k)))
        start += k
    return out


def merge_rank_metrics(metrics: list[dict]) -> dict:
    """The ranks' metrics as one: the mean over the ranks that report a key (aux_* only where a rank
    has aux tokens), weighted by the tokens each rank's value is a mean over where it says so
    (``token_weights``), so token means are the whole batch's; timings are left out."""
    weights = [m.get("token_weights", {}) for m in metrics]
    keys = (k for m in metrics for k in m if k != "token_weights" and not k.startswith("timing/"))
    out = {}
    for k in dict.fromkeys(keys):
        pairs = [(m[k], w.get(k, 1.0)) for m, w in zip(metrics, weights, strict=True) if k in m]
        total = sum(w for _, w in pairs)
        out[k] = sum(v * w for v, w in pairs) / total if total > 0 else sum(v for v, _ in pairs) / len(pairs)
    return out


class LearnerError(RuntimeError):
    """A learner rank died or failed: the update cannot go on (resume from the last checkpoint)."""


def _brief(e: BaseException) -> str:
    """One line: the remote exception itself for a failed task, the first line for a dead actor."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"[:300]
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


class LearnerGroup:
    def __init__(
        self,
        model_path: str,
        cfg: LearnerConfig,
        objective: ObjectiveConfig,
        seed: int = 0,
        placement=None,
        resources: dict | None = None,
        cache_dir: str | None = None,
    ):
        """``model_path``: a directory, or a HF id each rank resolves on its own node (in
        ``cache_dir`` or its HF cache). ``placement``: the run's
        :class:`~ekipl.placement.Placement` (rank R on bundle ``learner/R``); None: Ray places the
        ranks by their resources."""
        import ray

        self.cfg, self.objective = cfg, objective
        actor = ray.remote(Learner)
        opts = dict(num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker, max_restarts=0)
        if resources:
            opts["resources"] = resources

        def options(rank: int) -> dict:
            if placement is None:
                return opts
            return {**opts, "scheduling_strategy": placement.strategy(f"learner/{rank}")}

        self.workers = [
            actor.options(**options(r)).remote(r, cfg.world_size, model_path, cfg, objective, seed, cache_dir)
            for r in range(cfg.world_size)
        ]
        # The group meets on rank 0's node, wherever Ray put it (ranks may span nodes).
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        # Not awaited here: the ranks load the model and build DeepSpeed while the caller starts
        # engines; each actor runs setup before any later call (see ready()).
        self._setup = [w.setup.remote(addr, port) for w in self.workers]
        self._nodes: dict[str, str] = {}  # actor id -> node id, for weight sync

    def ready(self) -> None:
        """Wait until every rank has joined the group and built its engine (raises LearnerError)."""
        self._wait(self._setup, "setup")

    def _call(self, method: str, *per_rank_args, **kwargs):
        """Call ``method`` on every rank and return their results in rank order.

        Fails fast: when one rank dies or raises, the others may wait forever in a collective,
        so the first failure raises :class:`LearnerError` without waiting for them.
        """

        refs = [
            getattr(w, method).remote(*(a[r] for a in per_rank_args), **kwargs)
            for r, w in enumerate(self.workers)
        ]
        return self._wait(refs, method)

    def _wait(self, refs: list, method: str) -> list:
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                rank = refs.index(done[0])
                raise LearnerError(f"learner rank {rank} died during {method}: {_brief(e)}") from e
            except ray.exceptions.RayTaskError as e:
                rank = refs.index(done[0])
                raise LearnerError(f"learner rank {rank} failed in {method}: {_brief(e)}") from e
        return ray.get(refs)

    def _shards(self, batch: Batch) -> tuple[list[Batch], list[list[list[int]]]]:
        """Each rank's rows, and each rank's micro-batches: as many on every rank (the ZeRO
        collectives run per micro-batch), the shorter plans padded with empty micro-batches."""
        rows = shard_rows(len(batch), self.cfg.world_size)
        if any(not r for r in rows):
            raise ValueError(
                f"a batch of {len(batch)} actions cannot feed {self.cfg.world_size} learner ranks"
            )
        shards = [batch.select(r) for r in rows]
        plans = [plan_rows(s.attention_mask.sum(-1).tolist(), self.cfg) for s in shards]
        n = max(len(p) for p in plans)
        return shards, [p + [[] for _ in range(n - len(p))] for p in plans]

    def train_step(self, batch: Batch, sft: bool = False) -> dict:
        """Reference log-probs (when β > 0), then μ epochs of ZeRO updates; π_old is taken in the
        first epoch. Returns metrics and timings.

        ``sft``: CoT-SFT on the completions instead (no old or reference log-probs are needed).
        """
        t0 = time.perf_counter()
        shards, plans = self._shards(batch)
        # π_old comes from each rank's first epoch (Learner.update): no separate pass.
        if self.objective.kl_coef > 0 and not sft:
            ref = self._call("logprobs", shards, plans, reference=True)
            for s, lp in zip(shards, ref, strict=True):
                s.ref_logp = lp[:, : s.input_ids.shape[1] - 1]
        t1 = time.perf_counter()
        metrics = self._call("update", shards, plans, sft=sft, **batch.totals())
        t2 = time.perf_counter()
        out = merge_rank_metrics(metrics)
        out.update({"timing/logprob": t1 - t0, "timing/update": t2 - t1})
        return out

    def export_weights(self, path: str | None = None) -> tuple[str, int]:
        """Gather the full weights (bucketed under ZeRO-3) into one safetensors file written by rank 0
        on its node (default: rank 0's shared-memory weight buffer). Returns (path, bytes)."""
        return self._call("export_weights", [path] * self.cfg.world_size)[0]

    def export_adapter(self, out_dir: str) -> str | None:
        """With LoRA, the adapters in peft's layout under ``out_dir`` (rank 0 writes); else None."""
        return self._call("export_adapter", [out_dir] * self.cfg.world_size)[0]

    def _node(self, actor) -> str:
        import ray

        key = actor._actor_id.hex()
        if key not in self._nodes:
            self._nodes[key] = ray.get(actor.node_id.remote())
        return self._nodes[key]

    def sync_weights(self, engines) -> dict:
        """Export the weights once (bucketed gather) and load them into every policy engine replica.

        Rank 0 rewrites its shared-memory weight buffer in place (one copy of the weights); engines
        on rank 0's node map that file; engines on other nodes get its bytes through Ray's object
        store (one transfer per engine, fetched from rank 0's node). One call per engine either
        way: never one remote call per tensor. A failed engine raises
        :class:`~ekipl.engines.policy.PolicyEngineError`.
        """
        import ray

        from ekipl.engines.policy import PolicyEngineError

        t0 = time.perf_counter()
        path, nbytes = self.export_weights()
        t1 = time.perf_counter()
        rank0 = self.workers[0]
        remote: list = []
        try:
            home = self._node(rank0)
            local = [e for e in engines if self._node(e) == home]
            remote = [e for e in engines if self._node(e) != home]
            refs = [e.load_weights.remote(path) for e in local]
            if remote:
                blob = rank0.read_file.remote(path)  # stays in rank 0's object store until fetched
                refs += [e.load_weights_bytes.remote(blob) for e in remote]
            ray.get(refs)  # every engine is done reading before the next sync rewrites the buffer
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise PolicyEngineError(f"a policy engine failed to load new weights: {_brief(e)}") from e
        t2 = time.perf_counter()
        log.info(
            "weight sync: %.1f MB in %.3fs (export %.3fs, load %.3fs, %d engine(s) on other nodes)",
            nbytes / 1e6,
            t2 - t0,
            t1 - t0,
            t2 - t1,
            len(remote),
        )
        return {
            "timing/weight_sync": t2 - t0,
            "timing/weight_export": t1 - t0,
            "sync/bytes": float(nbytes),
            "sync/remote_engines": float(len(remote)),
        }

    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its DeepSpeed state under ``path`` (one host or a shared file system)."""
        self._call("save_checkpoint", [path] * self.cfg.world_size)

    def load_checkpoint(self, path: str) -> None:
        self._call("load_checkpoint", [path] * self.cfg.world_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._call("state_dict_cpu")[0]

    def shutdown(self):

        import ray

        try:  # each rank's shared-memory sync dir lives on its own node
            ray.get([w.cleanup.remote() for w in self.workers], timeout=10)
        except Exception:  # a dead rank: nothing more to do for it
            pass
        for w in self.workers:
            ray.kill(w)
