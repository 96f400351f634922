"""LoRA in the learner (``learner.lora``, peft): only the adapters train and hold optimizer state, the
vision tower is frozen, ZeRO-2 and ZeRO-3 on 2 ranks equal one process with peft and torch's AdamW,
the merged weights reach the engine (its log-probs equal the learner's after a sync), the KL
reference is the base with the adapters off, and the export holds the merged model and the adapter,
which ``resolve_model`` (so ``ekipl.eval``) merges back."""

from __future__ import annotations

import copy

import pytest
import torch
from test_learner import completion_logprobs, make_batch, reference_step, two_ranks

from ekipl.algo import objective as O
from ekipl.learner.config import LearnerConfig, LoraSettings
from ekipl.learner.logprobs import full_logprobs
from ekipl.models import hf

LORA = LoraSettings(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def batch(tiny_vlm, counting_data):
    return make_batch(tiny_vlm, counting_data)


def test_only_the_language_models_adapters_train_and_the_merge_is_peft_s(tiny_vlm):
    from ekipl.learner import lora

    torch.manual_seed(0)
    model = lora.wrap(hf.load_model(tiny_vlm), LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(".language_model." in n for n in trainable) and not any(".visual." in n for n in trainable)
    with torch.no_grad():  # B starts at zero (the merge would be the base): make it count
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    merged = {n: t for u in lora.merged_units(model) for n, t in u.produce()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == want.keys()  # transformers names, no adapter left
    assert max((merged[k] - want[k]).abs().max().item() for k in want) == 0.0
    with pytest.raises(ValueError, match="learner.lora: rank must be >= 0"):
        LearnerConfig(lora={"rank": -1})
    with pytest.raises(ValueError, match=r"learner.lora: unknown key\(s\) \['r'\]"):
        LearnerConfig(lora={"r": 8})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 trains LoRA in test_learning_signal and test_guidance
def test_lora_on_two_ranks_equals_one_process_and_the_engine_gets_the_merged_weights(
    ray_local, policy_router, batch, tiny_vlm, stage, tmp_path
):
    import ray

    from ekipl.learner.group import LearnerGroup, shard_rows
    from ekipl.modelref import export_policy, resolve_model

    b, groups, proc = batch
    # several LM-head chunks per micro-batch, each recomputed in the backward
    cfg = two_ranks(stage, lora=LORA, logits_chunk_tokens=5)
    group = LearnerGroup(str(tiny_vlm), cfg, O.ObjectiveConfig(kl_coef=0.1))
    try:
        before = group.state_dict()
        metrics = group.train_step(b)
        counts = group._call("parameter_counts")
        after = group.state_dict()
        # the KL reference: the same weights with the adapters off, i.e. the base model
        shards, plans = group._shards(b)
        ref_lp = group._call("logprobs", shards, plans, reference=True)
        engine = policy_router.actors[0]
        group.sync_weights([engine])
        g = groups[0]
        images = g.sample.load_images()
        enc = proc(text=[g.prompt], images=images, return_tensors="pt")
        prompt_ids, comp = enc["input_ids"][0].tolist(), g.actions[0].token_ids
        engine_lp = torch.tensor(ray.get(engine.score.remote(prompt_ids, comp, images)))
        policy = tmp_path / "policy"
        export_policy(group, str(tiny_vlm), policy)
    finally:
        group.shutdown()
    # only the adapters train: DeepSpeed's optimizer state covers them alone, on both ranks together
    n_adapter = sum(c["trainable"] for c in counts[:1])
    assert n_adapter == 16384 and sum(c["optimizer_elements"] for c in counts) in (n_adapter, 2 * n_adapter)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".language_model." in k and k.endswith("proj.weight") for k in changed)
    assert not any(".visual." in k for k in changed)
    # 2 ranks = one process (peft + torch AdamW)
    want, _, norms, _ = reference_step(tiny_vlm, [b], cfg, O.ObjectiveConfig())
    norm = norms[-1]
    assert metrics["actor/grad_norm"] == pytest.approx(norm, rel=1e-4)
    worst = max((after[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5, f"LoRA on ZeRO-{stage} differs from one process by {worst:.2e}"
    # the reference log-probs are the base model's
    base = hf.load_model(tiny_vlm).eval()
    with torch.no_grad():
        base_lp, _ = full_logprobs(base, b)
    got = torch.zeros_like(base_lp)
    for rows, lp in zip(shard_rows(len(b), 2), ref_lp, strict=True):
        got[rows, : lp.shape[1]] = lp
    m = b.completion_mask.bool()
    assert torch.allclose(got[m], base_lp[m], atol=1e-5)
    # the engine: the merged weights (its log-probs equal the learner's merged model's)
    merged = hf.load_model(tiny_vlm).eval()
    merged.load_state_dict(after)

    learner_lp = completion_logprobs(merged, enc, prompt_ids, comp)
    assert torch.allclose(engine_lp, learner_lp, atol=1e-3), (engine_lp - learner_lp).abs().max()
    # the other way in: the exported adapter alone, served by vLLM's own LoRA support on the base
    # (which the update moved far enough for an ignored adapter to fail the comparison)
    base_comp = completion_logprobs(base, enc, prompt_ids, comp)
    assert (base_comp - learner_lp).abs().max() > 1e-2
    served = torch.tensor(serve_adapter(tiny_vlm, policy / "adapter", prompt_ids, comp, g.sample.image_paths))
    assert torch.allclose(served, learner_lp, atol=1e-3), (served - learner_lp).abs().max()
    # the export: the merged model, and the adapter, which resolve_model (ekipl.eval) merges back
    assert (policy / "model.safetensors").is_file() and (policy / "adapter" / "adapter_config.json").is_file()
    remerged = hf.load_model(resolve_model(str(policy / "adapter"))).state_dict()
    assert max((remerged[k] - after[k]).abs().max().item() for k in after) < 1e-6


SERVE = """
import json, sys
from PIL import Image
from ekipl.engines import vllm_backend as vb
base, adapter, prompt, comp, paths = json.loads(sys.argv[1])
llm = vb.start_engine(vb.EngineSpec(model=base, dtype="float32", max_lora_rank=8))
print(json.dumps(vb.score(llm, prompt, comp, [Image.open(p).convert("RGB") for p in paths], adapter=adapter)))
"""


def serve_adapter(base, adapter, prompt_ids, comp, image_paths) -> list[float]:
    """The engine's log-probs of ``comp`` with ``adapter`` served through vLLM's LoRA support, in a
    process of its own (one vLLM engine per process on CPU)."""
    import json
    import subprocess
    import sys

    args = json.dumps([str(base), str(adapter), prompt_ids, comp, [str(p) for p in image_paths]])
    r = subprocess.run([sys.executable, "-c", SERVE, args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
