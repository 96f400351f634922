"""Run by tests/test_cluster.py against a simulated Ray cluster whose nodes declare logical GPUs:
the run's placement groups, actors of the real resource shapes placed in them, the no-silent-CPU
check of a policy engine and a learner rank given a (logical) GPU, and ``ekipl plan`` on the live
cluster. Prints one JSON object."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import ray

from ekipl.cluster import compose
from ekipl.config import to_run_config

address, tiny = sys.argv[1], sys.argv[2]
ray.init(address=address, log_to_driver=False, configure_logging=False)

OVERRIDES = [
    "learner.world_size=2",
    "learner.num_gpus_per_worker=1",
    "learner.num_cpus_per_worker=0.1",
    "model.engine_num_gpus=1",
    "model.engine_num_cpus=0.1",
    "+aux.big.kind=vllm",
    "+aux.big.model=Qwen/Qwen2-VL-72B-Instruct",
    "+aux.big.num_gpus=2",
    "+aux.big.tensor_parallel_size=2",
    "+aux.big.num_cpus=0.1",
]
run, sources = to_run_config(compose(OVERRIDES))

from ekipl.placement import Placement  # noqa: E402


@ray.remote
class Probe:
    """An actor of an ekipl actor's resource shape: where it landed and the GPUs Ray gave it."""

    def where(self):
        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    def workers(self, bundles):
        """As vLLM's Ray executor does: one GPU worker per bundle of the engine, in this group."""
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        ws = [
            Probe.options(
                num_cpus=0,
                num_gpus=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b),
            ).remote()
            for b in bundles
        ]
        return ray.get([w.where.remote() for w in ws])


out = {}
placement = Placement(run, sources)
out["table"] = placement.table()
shapes = {
    "learner/0": (0.1, 1),
    "learner/1": (0.1, 1),
    "policy/0": (0.1, 1),
    "aux/big/0": (0.1, 0),  # a TP=2 engine's actor: CPUs only; its workers take the GPUs
}
probes = {
    name: Probe.options(num_cpus=c, num_gpus=g, scheduling_strategy=placement.strategy(name)).remote()
    for name, (c, g) in shapes.items()
}
out["probes"] = {name: ray.get(p.where.remote()) for name, p in probes.items()}
out["aux_bundles"] = list(placement.bundle_indices("aux/big/0"))
out["aux_workers"] = ray.get(probes["aux/big/0"].workers.remote(placement.bundle_indices("aux/big/0")))
for p in probes.values():
    ray.kill(p)

# No silent CPU: a policy engine and a learner rank given a logical GPU stop at start-up.
from ekipl.engines import vllm_backend as vb  # noqa: E402
from ekipl.engines.policy import start_engine_actor  # noqa: E402
from ekipl.learner.group import LearnerError, LearnerGroup  # noqa: E402

engine = start_engine_actor(vb.EngineSpec(model=tiny), "policy/0", 0.1, 1, None, 1, placement, max_restarts=0)
try:
    ray.get(engine.ready.remote(), timeout=120)
    out["engine_error"] = None
except Exception as e:  # noqa: BLE001 -- the message is what the test reads
    out["engine_error"] = str(e)
try:
    LearnerGroup(tiny, run.learner, run.algorithm, placement=placement).ready()
    out["learner_error"] = None
except LearnerError as e:
    out["learner_error"] = str(e)
placement.remove()

# ekipl plan on the live cluster (2 nodes x 4 logical GPUs): the 2B preset's groups, one node each.
from ekipl.plan import main as plan_main  # noqa: E402

buf = io.StringIO()
with redirect_stdout(buf):
    rc = plan_main(
        [
            "--address",
            address,
            "--gpu-memory-gb",
            "80",
            "--json",
            sys.argv[3],
            "+experiment=counting_2b",
            "learner.world_size=3",
            "learner.num_cpus_per_worker=0.1",
            "model.engine_num_cpus=0.1",
            "++aux.qwen72b.num_cpus=0.1",
        ]
    )
out["plan_rc"], out["plan"] = rc, buf.getvalue()
print("RESULT " + json.dumps(out))
