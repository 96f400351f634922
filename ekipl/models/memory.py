"""GPU memory estimates from a model's ``config.json``, for ``ekipl plan`` and every run's start.

Sizes come from the architecture, never from weights: transformers builds the model on the meta
device (no memory, ~0.1 s even at 72B) and its parameters are counted. ``published/`` keeps the
architecture fields of the preset models' published ``config.json`` files, so a plan needs no
download (tests/test_plan.py checks their totals against the model cards').

All sizes in GiB. With P parameters, T of them trained, W learner ranks, b bytes per weight (2 in
bf16, 4 in fp32):

* an engine of w = TP x PP workers: weights ``b P / w`` per GPU; vLLM reserves
  ``gpu_memory_utilization x GPU`` and what the weights and :data:`ENGINE_OVERHEAD_GIB` (activations
  of the profiling pass, CUDA graphs, the sampler) leave is KV cache, at
  ``2 x layers/PP x max(1, kv_heads/TP) x head_dim x b`` bytes a token;
* a learner rank, by ZeRO stage (Adam: m and v in fp32, plus an fp32 master copy under bf16, so
  ``o = 12`` bytes a trained parameter in bf16, 8 in fp32; gradients ``b`` bytes, and the fp32
  gradient partition at the optimizer step, 4):

  - stage 3: ``(b P + (b + o + 4) T) / W``, plus the parameters ZeRO-3 gathers at once
    (``min(P, 1e9) b``, DeepSpeed's ``stage3_max_live_parameters``);
  - stage 2: ``b P + (b + o + 4) T / W``;  stage 1: ``b P + b T + (o + 4) T / W``;
  - the reference model (``algorithm.kl_coef > 0`` without LoRA): ``b P / W`` under ZeRO-3 (it is
    sharded like the policy), ``b P`` otherwise;
  - activations: with gradient checkpointing each layer's input is kept,
    ``mb x S x hidden x layers x b``, plus one layer recomputed (``mb x S x (4 hidden + 2
    intermediate) x b x 4``); without it every layer's (``x layers``); S = ``model.max_model_len``;
  - the LM head's fp32 logits, three ``rows x vocab x 4`` buffers (rows: ``logits_chunk_tokens``,
    or ``mb x S`` when 0);
  - :data:`LEARNER_OVERHEAD_GIB` of CUDA context and allocator slack.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

GIB = 1024**3
ENGINE_OVERHEAD_GIB = 2.0
LEARNER_OVERHEAD_GIB = 2.0
PUBLISHED = Path(__file__).resolve().parent / "published"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    params: int
    vision_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_params_per_rank: int  # LoRA parameters per unit of rank on the default target modules


def published_config(model_id: str) -> Path | None:
    """The kept copy of a published model's config (None when ekipl keeps none)."""
    p = PUBLISHED / (model_id.replace("/", "--") + ".json")
    return p if p.is_file() else None


def config_dict(where: str) -> dict:
    """A model's ``config.json`` as a dict: ``where`` is a model directory, a config file, or a HF id
    that ekipl keeps a published config of."""
    p = Path(where).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        p = published_config(where) or p
    if not p.is_file():
        raise FileNotFoundError(f"{where}: no config.json")
    return json.loads(p.read_text())


@functools.lru_cache(maxsize=32)
def _shape(text: str, targets: tuple[str, ...]) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = json.loads(text)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    visual = getattr(getattr(model, "model", None), "visual", None)
    lora = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets and ".visual." not in f".{name}."
    )
    text_cfg = cfg.get_text_config()
    heads = text_cfg.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        vision_params=sum(p.numel() for p in visual.parameters()) if visual is not None else 0,
        layers=text_cfg.num_hidden_layers,
        hidden=text_cfg.hidden_size,
        intermediate=text_cfg.intermediate_size,
        kv_heads=getattr(text_cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads,
        vocab=text_cfg.vocab_size,
        lora_params_per_rank=lora,
    )


def shape(where: str, lora_targets: tuple[str, ...] = ()):
    """The :class:`ModelShape` of the model at ``where`` (see :func:`config_dict`); ``lora_targets``:
    the modules LoRA adapters would go on (``learner.lora.target_modules``; none: no LoRA count)."""
    return _shape(json.dumps(config_dict(where), sort_keys=True), tuple(lora_targets))


def dtype_bytes(dtype: str, key: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{key}: cannot size dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclasses.dataclass(frozen=True)
class EngineMemory:
    reserved: float  # GiB vLLM claims per GPU
    weights: float
    overhead: float
    kv: float
    kv_tokens: int  # tokens of KV cache per engine (all its GPUs together hold each token once)
    min_tokens: int  # one sequence of max_model_len

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.min_tokens


def engine_memory(s: ModelShape, b: int, utilization: float, gpu_gib: float, tp: int, pp: int, max_len: int):
    weights = b * s.params / (tp * pp) / GIB
    reserved = utilization * gpu_gib
    kv = max(0.0, reserved - weights - ENGINE_OVERHEAD_GIB)
    per_token = 2 * (s.layers / pp) * max(1, s.kv_heads // tp) * s.head_dim * b
    return EngineMemory(reserved, weights, ENGINE_OVERHEAD_GIB, kv, int(kv * GIB / per_token), max_len)


@dataclasses.dataclass(frozen=True)
class LearnerMemory:
    parts: dict  # name -> GiB

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def learner_memory(s: ModelShape, lc, kl_coef: float, max_len: int) -> LearnerMemory:
    """Per rank; ``lc``: a :class:`~ekipl.learner.config.LearnerConfig`."""
    b = 2 if lc.bf16 else 4
    opt = 12 if lc.bf16 else 8
    W, P = lc.world_size, s.params
    if lc.lora.enabled:
        T = lc.lora.rank * s.lora_params_per_rank
    else:
        T = P - (s.vision_params if lc.freeze_vision else 0)
    stage = lc.zero_stage
    if stage == 3:
        states = (b * P + (b + opt + 4) * T) / W + min(P, 10**9) * b
    elif stage == 2:
        states = b * P + (b + opt + 4) * T / W
    else:
        states = b * P + b * T + (opt + 4) * T / W
    ref = 0.0
    if kl_coef > 0 and not lc.lora.enabled:
        ref = b * P / (W if stage == 3 else 1)
    mb = lc.micro_batch_size
    layer = mb * max_len * (4 * s.hidden + 2 * s.intermediate) * b * 4
    kept = mb * max_len * s.hidden * s.layers * b
    acts = kept + layer if lc.gradient_checkpointing else layer * s.layers
    rows = lc.logits_chunk_tokens or mb * max_len
    parts = {
        f"weights, gradients, Adam (ZeRO-{stage})": states / GIB,
        "reference model": ref / GIB,
        "activations": acts / GIB,
        "logits": 3 * rows * s.vocab * 4 / GIB,
        "CUDA context, slack": LEARNER_OVERHEAD_GIB,
    }
    return LearnerMemory(parts)
