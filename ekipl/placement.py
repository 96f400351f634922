"""Where every actor of a run goes: Ray placement groups, one bundle per GPU.

The groups (:func:`groups`):

* ``policy``: the learner ranks, then the policy engine replicas. The weight sync writes a buffer on
  learner rank 0's node that the engines there map, so the group is packed on one node
  (``placement.strategy=STRICT_PACK``) unless the config says otherwise (``PACK``: on one node
  where it fits; ``SPREAD``).
* ``aux:NAME:R``: replica R of each auxiliary vLLM model, one group each, its bundles on one node
  (``placement.aux_strategy``), on the nodes its ``aux.NAME.resources`` label.

An engine whose vLLM runs W = TP x PP workers gets W bundles of one GPU each: the engine's actor sits
on the first (CPUs only) and vLLM's Ray executor puts its workers on all W (VLLM_RAY_BUNDLE_INDICES).
An engine of one worker, and each learner rank, takes one bundle with its CPUs and GPUs. Custom
resources (``model.engine_resources``, ``learner.resources``, ``aux.NAME.resources``) go on the
actor's own bundle.

:func:`place` lays the groups out on a list of nodes as Ray's packing does, without Ray: ``ekipl
plan`` runs it for a cluster described on the command line, and every run runs it on the live
cluster's nodes before asking Ray, so that a layout that cannot fit is refused at once naming the
keys, instead of a placement group that waits forever. :class:`Placement` then creates the groups
on Ray and hands each actor its scheduling strategy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ekipl.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Bundle:
    """One bundle: ``actor`` (``learner/R``, ``policy/R``, ``aux/NAME/R``) and which of that actor's
    vLLM workers it holds (``worker``; 0 for learners and one-worker engines)."""

    actor: str
    worker: int
    resources: dict

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    strategy: str
    bundles: tuple[Bundle, ...]
    keys: str  # the config keys that size this group (named when it cannot be placed)

    def first_bundle(self, actor: str) -> int:
        return next(i for i, b in enumerate(self.bundles) if b.actor == actor)

    def bundles_of(self, actor: str) -> list[int]:
        return [i for i, b in enumerate(self.bundles) if b.actor == actor]


def _resources(cpus: float, gpus: float, custom: dict | None = None) -> dict:
    out = {"CPU": float(cpus)}
    if gpus:
        out["GPU"] = float(gpus)
    out.update({k: float(v) for k, v in (custom or {}).items()})
    return out


def engine_bundles(actor: str, workers: int, cpus: float, gpus: float, custom: dict) -> list[Bundle]:
    """An engine's bundles: one for a one-worker engine; one GPU per worker otherwise, the first
    also holding the actor's CPUs and custom resources."""
    if workers == 1:
        return [Bundle(actor, 0, _resources(cpus, gpus, custom))]
    return [Bundle(actor, 0, _resources(cpus, 1, custom))] + [
        Bundle(actor, w, _resources(0, 1)) for w in range(1, workers)
    ]


def groups(run: RunConfig, sources) -> list[Group]:
    """Every placement group of the run, in the order they are created."""
    m, lc, p = run.model, run.learner, run.placement
    bundles = [
        Bundle(f"learner/{r}", 0, _resources(lc.num_cpus_per_worker, lc.num_gpus_per_worker, lc.resources))
        for r in range(lc.world_size)
    ]
    for r in range(m.engine_replicas):
        bundles += engine_bundles(
            f"policy/{r}",
            m.tensor_parallel_size * m.pipeline_parallel_size,
            m.engine_num_cpus,
            m.engine_num_gpus,
            m.engine_resources,
        )
    out = [
        Group(
            "policy",
            p.strategy,
            tuple(bundles),
            "learner.world_size, learner.num_cpus_per_worker, learner.num_gpus_per_worker, "
            "learner.resources, model.engine_replicas, model.engine_num_cpus, model.engine_num_gpus, "
            "model.engine_resources or placement.strategy (a local Ray's CPUs: trainer.ray_num_cpus)",
        )
    ]
    for s in sources:
        if s.kind != "vllm":
            continue
        for r in range(s.replicas):
            out.append(
                Group(
                    f"aux:{s.name}:{r}",
                    p.aux_strategy,
                    tuple(
                        engine_bundles(
                            f"aux/{s.name}/{r}",
                            s.tensor_parallel_size * s.pipeline_parallel_size,
                            s.num_cpus,
                            s.num_gpus,
                            s.resources,
                        )
                    ),
                    f"aux.{s.name}.replicas, aux.{s.name}.num_cpus, aux.{s.name}.num_gpus, "
                    f"aux.{s.name}.resources or placement.aux_strategy",
                )
            )
    return out


# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Node:
    """A node's free resources (``CPU``, ``GPU``, custom labels), as Ray reports them."""

    name: str
    resources: dict

    def fits(self, need: dict) -> bool:
        return all(self.resources.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v)

    def take(self, need: dict) -> None:
        for k, v in need.items():
            self.resources[k] = self.resources.get(k, 0.0) - v


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one bundle landed: the node's index and, for a GPU bundle, the node's GPU indices (in
    the order Ray hands them out: by the bundles' order on that node)."""

    node: int
    gpus: tuple[int, ...] = ()


def _total(bundles) -> dict:
    out: dict = {}
    for b in bundles:
        for k, v in b.resources.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _place_group(g: Group, nodes: list[Node]) -> list[int]:
    """Node index per bundle of ``g`` (the nodes' free resources are taken), or ConfigError."""
    strict = g.strategy == "STRICT_PACK"
    if g.strategy in ("STRICT_PACK", "PACK"):
        need = _total(g.bundles)
        for i, n in enumerate(nodes):  # one node for all, if any has room
            if n.fits(need):
                n.take(need)
                return [i] * len(g.bundles)
        if strict:
            raise ConfigError(
                f"placement group {g.name!r} needs {_fmt(need)} on one node (placement strategy "
                f"STRICT_PACK) and no node has it (free: {'; '.join(_fmt(n.resources) for n in nodes)}); "
                f"change {g.keys}"
            )
    out: list[int] = []
    used: set[int] = set()
    for b in g.bundles:
        order = range(len(nodes))
        if "SPREAD" in g.strategy:  # nodes not yet used by the group first
            order = sorted(order, key=lambda i: (i in used, i))
        strict_spread = g.strategy == "STRICT_SPREAD"
        pick = next(
            (i for i in order if nodes[i].fits(b.resources) and not (strict_spread and i in used)), None
        )
        if pick is None:
            raise ConfigError(
                f"placement group {g.name!r}: no node has room for {b.actor}'s bundle {_fmt(b.resources)} "
                f"(free: {'; '.join(_fmt(n.resources) for n in nodes)}); change {g.keys}"
            )
        nodes[pick].take(b.resources)
        used.add(pick)
        out.append(pick)
    return out


def _fmt(res: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if v) or "nothing"


def place(gs: list[Group], nodes: list[Node]) -> dict[tuple[str, int], Slot]:
    """Lay the groups out on ``nodes`` in order (their free resources are consumed): (group name,
    bundle index) -> :class:`Slot`. Raises ConfigError naming the keys when one cannot fit."""
    nodes = [Node(n.name, dict(n.resources)) for n in nodes]
    next_gpu = [0] * len(nodes)
    out: dict[tuple[str, int], Slot] = {}
    for g in gs:
        for b_idx, (bundle, node) in enumerate(zip(g.bundles, _place_group(g, nodes), strict=True)):
            k = int(bundle.gpus) if bundle.gpus >= 1 else (1 if bundle.gpus else 0)
            out[(g.name, b_idx)] = Slot(node, tuple(range(next_gpu[node], next_gpu[node] + k)))
            next_gpu[node] += int(bundle.gpus) if bundle.gpus >= 1 else 0
    return out


def ray_nodes() -> list[Node]:
    """The live cluster's nodes and their resources (Ray's own names). Their totals: what other jobs
    hold is not known here, and a group that waits for it times out (``placement.timeout_s``)."""
    import ray

    return [Node(n["NodeID"], dict(n.get("Resources", {}))) for n in ray.nodes() if n.get("Alive")]


# ------------------------------------------------------------------------------------------------
class Placement:
    """The run's placement groups on Ray; :meth:`strategy` gives each actor its bundle."""

    def __init__(self, run: RunConfig, sources):
        import ray
        from ray.util.placement_group import placement_group

        self.groups = groups(run, sources)
        place(self.groups, ray_nodes())  # refuse, naming the keys, what the cluster cannot hold
        self._pgs = {}
        for g in self.groups:
            self._pgs[g.name] = placement_group([dict(b.resources) for b in g.bundles], strategy=g.strategy)
        timeout = run.placement.timeout_s
        try:
            ray.get([pg.ready() for pg in self._pgs.values()], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.remove()
            raise ConfigError(
                f"placement.timeout_s: the placement groups were not ready within {timeout:g}s (the "
                "cluster's resources are held by other jobs, or a node left); their shapes: "
                + "; ".join(
                    f"{g.name}: {len(g.bundles)} bundles, {_fmt(_total(g.bundles))}" for g in self.groups
                )
            ) from None

    def _group_of(self, actor: str) -> Group:
        role, *rest = actor.split("/")
        head = "policy" if role in ("learner", "policy") else "aux:" + ":".join(rest)
        return next(g for g in self.groups if g.name == head)

    def strategy(self, actor: str):
        """Ray's scheduling strategy for ``actor`` (``learner/R``, ``policy/R``, ``aux/NAME/R``):
        its first bundle; child tasks (vLLM's Ray workers) stay in the group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        g = self._group_of(actor)
        return PlacementGroupSchedulingStrategy(
            self._pgs[g.name],
            placement_group_bundle_index=g.first_bundle(actor),
            placement_group_capture_child_tasks=True,
        )

    def bundle_indices(self, actor: str) -> tuple[int, ...]:
        """A multi-worker engine's bundles (its vLLM workers'); () for one-worker actors."""
        idx = self._group_of(actor).bundles_of(actor)
        return tuple(idx) if len(idx) > 1 else ()

    def table(self) -> dict[str, dict]:
        """actor -> {group, bundles, node}, from Ray's placement group table."""
        from ray.util import placement_group_table

        out = {}
        for g in self.groups:
            nodes = placement_group_table(self._pgs[g.name]).get("bundles_to_node_id", {})
            for i, b in enumerate(g.bundles):
                rec = out.setdefault(b.actor, {"group": g.name, "bundles": [], "nodes": []})
                rec["bundles"].append(i)
                rec["nodes"].append(nodes.get(i))
        return out

    def remove(self) -> None:
        from ray.util import remove_placement_group

        for pg in self._pgs.values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 -- Ray already gone
                pass
        self._pgs = {}


def write_placement(path: Path, placement: Placement | None, router, sources, learner) -> dict:
    """Where each actor landed (logged, and written to ``placement.json``): the Ray node ids per
    role, and per actor its group, bundles, node and the GPU ids Ray gave it."""
    import ray

    def where(actors):
        return ray.get([a.node_id.remote() for a in actors])

    nodes = {
        "policy": where(router.actors),
        "learner": where(learner.workers),
        "aux": {s.name: where(s.actors) for s in sources if hasattr(s, "actors")},
    }
    if placement is not None:
        actors = placement.table()
        named = {f"learner/{r}": w for r, w in enumerate(learner.workers)}
        named.update({f"policy/{r}": a for r, a in enumerate(router.actors)})
        for s in sources:
            named.update({f"aux/{s.name}/{r}": a for r, a in enumerate(getattr(s, "actors", []))})
        gpus = dict(zip(named, ray.get([a.gpu_ids.remote() for a in named.values()]), strict=True))
        for name, rec in actors.items():
            rec["gpu_ids"] = gpus.get(name, [])
        nodes["actors"] = actors
    path.write_text(json.dumps(nodes, indent=1))
    log.info("placement: %s", json.dumps(nodes))
    return nodes
