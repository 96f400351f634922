"""``ekipl plan`` and the engine settings: the published configs' sizes, hand-computed memory, the
refusals the issue names, engine keys per section, placement groups laid out without Ray. The same
plan on a simulated Ray cluster with logical GPUs is in tests/test_cluster.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ekipl.cluster import compose
from ekipl.config import ConfigError, to_run_config
from ekipl.engines import vllm_backend as vb
from ekipl.models import memory as mem
from ekipl.placement import Node, groups, place
from ekipl.plan import described_nodes, main, make_plan

GIB = 2**30

# Parameter totals on the model cards (billions, as the cards round them).
CARDS = {
    "Qwen/Qwen2-VL-2B-Instruct": 2.21,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29,
    "Qwen/Qwen2-VL-72B-Instruct": 73.4,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29,
    "Qwen/Qwen2.5-VL-72B-Instruct": 73.4,
    "Qwen/Qwen3-VL-2B-Instruct": 2.13,
    "Qwen/Qwen3-VL-4B-Instruct": 4.44,
    "Qwen/Qwen3-VL-8B-Instruct": 8.77,
}


@pytest.mark.parametrize("model_id", sorted(CARDS))
def test_published_configs_have_the_model_cards_sizes(model_id):
    """The kept configs build (on the meta device) into models of the cards' sizes, so their layer
    counts, widths and tied embeddings are the published ones."""
    s = mem.shape(model_id)
    assert s.params / 1e9 == pytest.approx(CARDS[model_id], abs=0.006 * CARDS[model_id])


def test_every_preset_model_has_a_kept_config():
    from pathlib import Path

    conf = Path(__file__).resolve().parent.parent / "conf"
    ids = [
        line.split(":", 1)[1].strip()
        for f in list((conf / "model").glob("*.yaml")) + list((conf / "aux").glob("*.yaml"))
        for line in f.read_text().splitlines()
        if line.strip().startswith(("path: Qwen/", "model: Qwen/"))
    ] + ["Qwen/Qwen2.5-VL-72B-Instruct"]  # counting_qwen25vl_7b's auxiliary model
    assert ids and all(mem.published_config(i) for i in ids), ids


def _plan(overrides, nodes=1, gpus=8, gib=80.0):
    run, sources = to_run_config(compose(overrides))
    return make_plan(run, sources, described_nodes(nodes, gpus, None, []), gib)


def test_the_7b_preset_fits_one_8_gpu_node_with_hand_computed_memory():
    rows = _plan(["+experiment=counting_qwen25vl_7b"])
    by_actor = {}
    for r in rows:
        by_actor.setdefault(r.actor, []).append(r)
    assert sorted(by_actor) == ["aux/qwen72b/0", "learner/0", "learner/1", "learner/2", "policy/0"]
    assert sorted(g for r in rows for g in r.gpus) == list(range(8)) and {r.node for r in rows} == {0}
    assert [len(by_actor["aux/qwen72b/0"])] == [4]  # TP=4: four bundles of one GPU
    P = 8_292_166_656  # Qwen2.5-VL-7B
    # 3 ranks, ZeRO-3, bf16: (2 + 2 + 12 + 4) bytes/param / 3, plus 1e9 live parameters in bf16;
    # the reference sharded 3 ways; checkpointed activations at micro-batch 2 x 4,096 tokens; three
    # fp32 logit buffers of 256 x 152,064; 2 GiB of context.
    states = (20 * P / 3 + 2e9) / GIB
    ref = 2 * P / 3 / GIB
    acts = (2 * 4096 * 3584 * 28 * 2 + 2 * 4096 * (4 * 3584 + 2 * 18944) * 2 * 4) / GIB
    logits = 3 * 256 * 152064 * 4 / GIB
    learner = by_actor["learner/0"][0]
    assert learner.gib == pytest.approx(states + ref + acts + logits + 2.0, rel=1e-9)
    assert 60 < learner.gib < 80
    engine = by_actor["policy/0"][0]
    assert engine.gib == pytest.approx(0.85 * 80)
    kv_tokens = int((0.85 * 80 - 2 * P / GIB - 2.0) * GIB / (2 * 28 * 4 * 128 * 2))
    assert f"{kv_tokens:,} tokens" in engine.detail
    # the 72B auxiliary model: 73.4B bf16 weights over 4 GPUs, 2 of its 8 KV heads on each
    aux = by_actor["aux/qwen72b/0"][0]
    assert f"weights {2 * 73_406_351_360 / 4 / GIB:.1f}" in aux.detail


def test_qwen3vl_presets_fit(capsys):
    for model in ("qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b"):
        rows = _plan(["+experiment=counting_2b", f"model={model}"])
        assert all(r.gib is not None and r.gib <= 80 for r in rows)
    P = 8_767_123_696  # Qwen3-VL-8B: 36 layers, 8 KV heads of 128
    rows = _plan(["+experiment=counting_2b", "model=qwen3vl_8b"])
    engine = next(r for r in rows if r.actor == "policy/0")
    kv_tokens = int((0.85 * 80 - 2 * P / GIB - 2.0) * GIB / (2 * 36 * 8 * 128 * 2))
    assert f"{kv_tokens:,} tokens" in engine.detail


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.gpu_memory_utilization=0.15", "model.gpu_memory_utilization"),
        ("learner.world_size=12", "learner.world_size"),
    ],
)
def test_plan_refuses_what_cannot_fit_naming_the_key(override, key, capsys):
    args = [
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gb",
        "80",
        "+experiment=counting_qwen25vl_7b",
    ]
    assert main(args) == 0
    assert "fits: 8 of 8 GPUs" in capsys.readouterr().out
    assert main([*args, override]) == 2
    assert key in capsys.readouterr().err


def test_a_learner_too_big_for_its_gpu_is_refused_naming_world_size(tmp_path):
    with pytest.raises(ConfigError, match="learner.world_size: a learner rank needs"):
        _plan(["+experiment=counting_qwen25vl_7b", "learner.world_size=1", "aux=none"], gib=40.0)


def test_plan_json_and_labels(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--nodes", "2", "--label", "aux_node=1@1", "--json", str(out)]
    assert main([*args, "+experiment=counting_2b", "+aux.qwen72b.resources.aux_node=1"]) == 0
    rows = json.loads(out.read_text())
    assert {r["node"] for r in rows if r["actor"].startswith("aux/")} == {1}
    assert {r["node"] for r in rows if not r["actor"].startswith("aux/")} == {0}
    assert main(["--label", "bad", "+experiment=counting_2b"]) == 2


def test_engine_keys_are_checked_per_section():
    with pytest.raises(ConfigError, match=r"model.engine_num_gpus=2 must equal model.tensor_parallel_size"):
        to_run_config({"model": {"engine_num_gpus": 2}})
    with pytest.raises(ConfigError, match=r"aux.big.num_gpus=4 must equal aux.big.tensor_parallel_size"):
        to_run_config(
            {"aux": {"big": {"kind": "vllm", "model": "Org/Big", "num_gpus": 4, "tensor_parallel_size": 2}}}
        )
    with pytest.raises(ConfigError, match=r"model.gpu_memory_utilization must be in \(0, 1\]"):
        to_run_config({"model": {"gpu_memory_utilization": 1.5}})
    run, sources = to_run_config(
        {"model": {"gpu_memory_utilization": 0.7, "enforce_eager": False, "max_model_len": 512}, "aux": {}}
    )
    spec = vb.engine_spec(run.model, "m", 3, enable_weight_sync=True)
    kw = vb.engine_kwargs(spec)
    assert kw["gpu_memory_utilization"] == 0.7 and kw["enforce_eager"] is False and kw["max_model_len"] == 512
    assert "max_num_batched_tokens" not in kw and "enable_prefix_caching" not in kw


def test_engine_defaults_per_device_and_multi_gpu_engines():
    assert vb.device_default("gpu_memory_utilization", cpu=False) == 0.85
    assert vb.device_default("enforce_eager", cpu=False) is False
    assert vb.device_default("gpu_memory_utilization", cpu=True) == 0.15
    kw = vb.engine_kwargs(vb.EngineSpec(model="m"))  # this machine: CPU
    assert kw["gpu_memory_utilization"] == 0.15 and kw["enforce_eager"] is True
    assert kw["distributed_executor_backend"] == "uni"
    spec = vb.EngineSpec(
        model="m", tensor_parallel_size=4, max_num_batched_tokens=8192, enable_prefix_caching=False
    )
    kw = vb.engine_kwargs(spec)
    assert kw["distributed_executor_backend"] == "mp" and kw["tensor_parallel_size"] == 4  # standalone
    placed = vb.engine_kwargs(dataclasses.replace(spec, bundle_indices=(4, 5, 6, 7)))
    assert placed["distributed_executor_backend"] == "ray"  # its workers on its placement bundles
    assert kw["max_num_batched_tokens"] == 8192 and kw["enable_prefix_caching"] is False
    env = vb.actor_runtime_env(share=1, num_gpus=0, bundle_indices=(4, 5, 6, 7))
    assert env["env_vars"]["VLLM_RAY_BUNDLE_INDICES"] == "4,5,6,7"


def test_aux_sources_inherit_the_image_budget_without_editing_configs():
    run, sources = to_run_config(
        {
            "model": {"max_pixels": 1000},
            "aux": {"b": {"kind": "vllm", "model": "Org/B"}, "t": {"kind": "dataset"}},
        }
    )
    assert run.aux["b"].max_pixels == 1000 and sources[0].max_pixels == 1000
    assert run.aux["t"].max_pixels is None


def test_placement_groups_without_ray():
    """The groups' shapes (learners then policy engines in one; each aux replica in its own, one
    bundle per TP worker) and a layout on two described nodes that Ray's packing would give."""
    run, sources = to_run_config(compose(["+experiment=counting_2b", "aux.qwen72b.replicas=2"]))
    gs = groups(run, sources)
    assert [g.name for g in gs] == ["policy", "aux:qwen72b:0", "aux:qwen72b:1"]
    assert [b.actor for b in gs[0].bundles] == ["learner/0", "learner/1", "learner/2", "policy/0"]
    assert all(b.resources["GPU"] == 1 for g in gs for b in g.bundles)
    assert [b.worker for b in gs[1].bundles] == [0, 1, 2, 3] and gs[1].bundles[1].resources["CPU"] == 0
    nodes = [Node(f"n{i}", {"CPU": 64.0, "GPU": 8.0}) for i in range(2)]
    slots = place(gs, nodes)
    assert {slots[("policy", i)].node for i in range(4)} == {0}
    assert {slots[("aux:qwen72b:0", i)].node for i in range(4)} == {0}
    assert {slots[("aux:qwen72b:1", i)].node for i in range(4)} == {1}
    assert [slots[("aux:qwen72b:0", i)].gpus for i in range(4)] == [(4,), (5,), (6,), (7,)]
    with pytest.raises(ConfigError, match="STRICT_PACK.*learner.world_size"):
        place(groups(*to_run_config(compose(["+experiment=counting_2b", "learner.world_size=8"]))), nodes)
    # PACK spreads what one node cannot hold
    run, sources = to_run_config(
        compose(["+experiment=counting_2b", "learner.world_size=8", "placement.strategy=PACK"])
    )
    slots = place(groups(run, sources)[:1], nodes)
    assert sorted({s.node for s in slots.values()}) == [0, 1]


GPU_PRESETS = [
    "counting_2b",
    "counting_7b",
    "counting_qwen25vl_7b",
    "geometry_2b",
    "geometry_7b",
    "trance_2b",
    "trance_7b",
]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_fit_one_node_overlap_communication_and_sample_one_step_off(preset):
    run, sources = to_run_config(compose([f"+experiment={preset}"]))
    rows = make_plan(run, sources, described_nodes(1, 8, None, []), 80.0)
    assert all(r.gib is not None and r.gib <= 80 for r in rows)
    zero = run.learner.deepspeed_config(1)["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert run.rollout.one_step_off
    cpu, _ = to_run_config(compose(["+experiment=cpu_demo"]))
    cpu_zero = cpu.learner.deepspeed_config(1)["zero_optimization"]
    assert not cpu_zero["overlap_comm"] and not cpu_zero["contiguous_gradients"]


def test_hub_ids_reach_actors_as_ids_and_resolve_in_the_nodes_cache(tmp_path, tiny_vlm, monkeypatch):
    """A HF id is resolved on the node that runs it (model.cache_dir: a HF cache every node mounts),
    never sent as the driver's cache path; a node without it says which node and what to fetch."""
    from ekipl.modelref import actor_model, resolve_model
    from ekipl.models.resolve import ModelNotFoundError, on_node

    cache = tmp_path / "hf"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    for f in tiny_vlm.iterdir():
        (snap / f.name).symlink_to(f)
    assert on_node("org/tiny", str(cache)) == str(snap)
    driver = resolve_model("org/tiny", key="model.path", cache_dir=str(cache))
    assert driver == str(snap) and actor_model("org/tiny", driver) == "org/tiny"
    assert actor_model(str(tiny_vlm), str(tiny_vlm)) == str(tiny_vlm)  # a local directory as it is
    assert actor_model("tiny-qwen2-vl", "/cache/tiny") == "/cache/tiny"  # built on the driver
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match=r"aux.big.model: 'org/other' is neither .* of node"):
        on_node("org/other", None, "aux.big.model")


@pytest.mark.slow
def test_a_run_that_cannot_be_placed_is_refused_before_any_actor_starts(ray_local, tmp_path):
    """Every run makes the plan's check on the live cluster first: learner ranks that ask for more
    CPUs than the session's Ray has stop the run with the keys to change, and no actor was started."""
    from runs import SMALL

    from ekipl.train import Trainer

    trainer = Trainer(compose([*SMALL, "learner.num_cpus_per_worker=64", f"trainer.output_dir={tmp_path}"]))
    try:
        with pytest.raises(
            ConfigError, match=r"placement group 'policy' needs CPU=129.*learner.num_cpus_per_worker"
        ):
            trainer.setup()
        assert trainer.router is None and trainer.learner is None and trainer.placement is None
    finally:
        trainer.close()
