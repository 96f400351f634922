"""``ekipl plan``: a dry run of ``ekipl.train``'s start-up. It starts no engine and loads no weights.

    ekipl plan --nodes 1 --gpus-per-node 8 --gpu-memory-gb 80 +experiment=counting_qwen25vl_7b
    ekipl plan --address auto +experiment=counting_2b        # the Ray cluster you are on

It prints where every actor would go (node, GPU, placement group bundle) and its estimated GPU
memory (:mod:`ekipl.models.memory`: weights from ``config.json`` and the dtype, the engines' KV
cache, parameters, gradients and Adam state by ZeRO stage, the reference model), then whether the
plan fits. A plan that cannot fit exits 2, naming the key to change. ``ekipl.train`` runs the same
check (:func:`check`) before it starts an actor.

Without ``--address`` the cluster is the one described on the command line; each node can carry
custom resources (``--label aux_node=4@1``: 4 of ``aux_node`` on node 1). With ``--address`` the
plan reads the live cluster's nodes and lays the run's placement groups out on them as Ray would;
``--gpu-memory-gb`` then gives the GPU size, or it is asked of one GPU of the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ekipl.config import ConfigError, RunConfig
from ekipl.models import memory as mem
from ekipl.placement import Group, Node, groups, place


@dataclasses.dataclass
class Row:
    """One bundle of the plan: where it goes and what it holds."""

    node: int
    gpus: tuple[int, ...]
    actor: str
    group: str
    bundle: int
    role: str  # learner, engine, engine worker
    gib: float | None = None  # estimated GPU memory (None: no GPU, or not estimated)
    detail: str = ""


def model_config_source(ref: str, seed: int, key: str, cache_dir: str | None = None) -> str:
    """Where the plan reads a model's ``config.json``: the published copy ekipl keeps, else where the
    run itself finds the model (:func:`ekipl.modelref.resolve_model`: a local directory, a tiny or
    warm-start build, a HF id in the local cache). Nothing is downloaded."""
    from ekipl.modelref import resolve_model

    return ref if mem.published_config(ref) else resolve_model(ref, seed, key, cache_dir)


def _bundle_rows(run: RunConfig, g: Group, slots, gpu_gib: float | None, shapes: dict) -> list[Row]:
    from ekipl.engines.vllm_backend import device_default

    rows = []
    for i, b in enumerate(g.bundles):
        role, *rest = b.actor.split("/")
        slot = slots[(g.name, i)]
        row = Row(slot.node, slot.gpus, b.actor, g.name, i, "learner" if role == "learner" else "engine")
        rows.append(row)
        if not slot.gpus or gpu_gib is None:
            continue
        if role == "learner":
            lm = mem.learner_memory(
                shapes["model"], run.learner, run.algorithm.kl_coef, run.model.max_model_len
            )
            row.gib = lm.total
            row.detail = ", ".join(f"{k} {v:.1f}" for k, v in lm.parts.items() if v)
            if lm.total > gpu_gib:
                raise ConfigError(
                    f"learner.world_size: a learner rank needs ~{lm.total:.1f} GiB ({row.detail}) and a GPU "
                    f"has {gpu_gib:g}; raise learner.world_size (ZeRO-3 shards by it), or set "
                    "learner.zero_stage=3, learner.gradient_checkpointing=true, learner.freeze_vision=true, "
                    "a smaller learner.micro_batch_size or learner.lora.rank"
                )
            continue
        section, key = ("model", "model") if role == "policy" else (f"aux.{rest[0]}", rest[0])
        cfg = run.model if role == "policy" else run.aux[rest[0]]
        util = cfg.gpu_memory_utilization
        util = device_default("gpu_memory_utilization", cpu=False) if util is None else util
        dtype = run.model.dtype if role == "policy" else "auto"
        em = mem.engine_memory(
            shapes[key],
            mem.dtype_bytes(dtype, f"{section}.dtype"),
            util,
            gpu_gib,
            cfg.tensor_parallel_size,
            cfg.pipeline_parallel_size,
            cfg.max_model_len,
        )
        row.role = "engine" if b.worker == 0 else "engine worker"
        row.gib = em.reserved
        row.detail = (
            f"vLLM reserves {em.reserved:.1f}: weights {em.weights:.1f}, overhead {em.overhead:.1f}, "
            f"KV cache {em.kv:.1f} ({em.kv_tokens:,} tokens, {em.kv_tokens // cfg.max_model_len} "
            f"sequences of {cfg.max_model_len})"
        )
        if not em.fits:
            raise ConfigError(
                f"{section}.gpu_memory_utilization: {util:g} x {gpu_gib:g} GiB = {em.reserved:.1f} GiB "
                f"leaves {em.kv:.1f} GiB of KV cache after {em.weights:.1f} GiB of weights and "
                f"{em.overhead:.1f} of "
                f"overhead: {em.kv_tokens:,} tokens, less than one sequence of {section}.max_model_len="
                f"{cfg.max_model_len}; raise {section}.gpu_memory_utilization or "
                f"{section}.tensor_parallel_size (with its GPUs), or lower {section}.max_model_len"
            )
    return rows


def make_plan(run: RunConfig, sources, nodes: list[Node], gpu_gib: float | None) -> list[Row]:
    """Every bundle's place and memory on ``nodes`` (GPUs of ``gpu_gib`` GiB; None: not checked).
    Raises ConfigError naming the key when it cannot fit."""
    gs = groups(run, sources)
    slots = place(gs, nodes)
    shapes = {}
    if gpu_gib is not None:
        m = run.model
        where = model_config_source(m.path, m.seed, "model.path", m.cache_dir)
        shapes["model"] = mem.shape(where, run.learner.lora.target_modules)
        for s in sources:
            if s.kind == "vllm":
                shapes[s.name] = mem.shape(
                    model_config_source(s.model, m.seed, f"aux.{s.name}.model", m.cache_dir)
                )
    return [row for g in gs for row in _bundle_rows(run, g, slots, gpu_gib, shapes)]


def render(rows: list[Row], nodes: list[Node], gpu_gib: float | None) -> str:
    lines = []
    for n_idx, node in enumerate(nodes):
        mine = [r for r in rows if r.node == n_idx]
        if not mine:
            continue
        lines.append(f"node {n_idx} ({node.name}):")
        for r in sorted(mine, key=lambda r: (r.gpus[:1] or (10**6,), r.group, r.bundle)):
            where = "GPU " + ",".join(map(str, r.gpus)) if r.gpus else "CPU"
            gib = f"{r.gib:5.1f} GiB" if r.gib is not None else "    -    "
            lines.append(f"  {where:8s} {r.actor:18s} {r.group}[{r.bundle}]  {r.role:13s} {gib}  {r.detail}")
    used = {(r.node, g) for r in rows for g in r.gpus}
    total = sum(int(n.resources.get("GPU", 0)) for n in nodes)
    size = f" of {gpu_gib:g} GiB" if gpu_gib is not None else ""
    lines.append(f"fits: {len(used)} of {total} GPUs{size} used")
    return "\n".join(lines)


def described_nodes(n: int, gpus: int, cpus: int | None, labels: list[str]) -> list[Node]:
    nodes = [
        Node(f"node{i}", {"CPU": float(cpus if cpus is not None else 16 * max(1, gpus)), "GPU": float(gpus)})
        for i in range(n)
    ]
    for spec in labels:
        try:
            kv, idx = spec.rsplit("@", 1)
            k, v = kv.split("=", 1)
            nodes[int(idx)].resources[k] = float(v)
        except (ValueError, IndexError):
            raise ConfigError(
                f"--label {spec!r}: expected NAME=AMOUNT@NODE with NODE in 0..{n - 1}"
            ) from None
    return nodes


def gpu_memory_gib(timeout_s: float = 60.0) -> float | None:
    """One GPU's memory in GiB, asked of the cluster (None: it has no GPU that CUDA sees)."""
    import ray

    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1)
    def probe():
        import torch

        return (
            torch.cuda.get_device_properties(0).total_memory / mem.GIB if torch.cuda.is_available() else None
        )

    try:
        return ray.get(probe.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return None


def check(run: RunConfig, sources) -> list[Row]:
    """The plan on the live Ray cluster, as every run checks it before starting actors: placement
    always, memory where the cluster's GPUs are CUDA devices. Raises ConfigError naming the key."""
    from ekipl.placement import ray_nodes

    uses_gpus = any(b.gpus for g in groups(run, sources) for b in g.bundles)
    return make_plan(run, sources, ray_nodes(), gpu_memory_gib() if uses_gpus else None)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ekipl plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a Ray cluster to plan on (auto: the one this node belongs to)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GiB per GPU (described: default 80)")
    p.add_argument("--cpus-per-node", type=int, default=None, help="default: 16 per GPU")
    p.add_argument(
        "--label", action="append", default=[], help="NAME=AMOUNT@NODE: a custom resource on a node"
    )
    p.add_argument("--json", help="also write the plan's rows to this file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as ekipl.train takes them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ekipl.cluster import compose
    from ekipl.config import to_run_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run, sources = to_run_config(compose(args.overrides))
        if args.address:
            import ray

            from ekipl.placement import ray_nodes

            ray.init(
                address=args.address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                ignore_reinit_error=True,  # a driver already connected plans on its cluster
            )
            nodes = ray_nodes()
            gpu_gib = args.gpu_memory_gb if args.gpu_memory_gb is not None else gpu_memory_gib()
            where = f"Ray cluster at {args.address}: {len(nodes)} node(s)"
        else:
            nodes = described_nodes(args.nodes, args.gpus_per_node, args.cpus_per_node, args.label)
            gpu_gib = (
                args.gpu_memory_gb
                if args.gpu_memory_gb is not None
                else (80.0 if args.gpus_per_node else None)
            )
            where = f"described cluster: {args.nodes} node(s) x {args.gpus_per_node} GPUs"
        print(f"ekipl plan on a {where}" + (f", {gpu_gib:g} GiB a GPU" if gpu_gib else ""))
        rows = make_plan(run, sources, nodes, gpu_gib)
    except ConfigError as e:
        print(f"ekipl plan: cannot fit: {e}", file=sys.stderr)
        return 2
    print(render(rows, nodes, gpu_gib))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
