"""Loading models with transformers, and log-probs of given tokens.

These are the learner-side counterparts of :mod:`ekipl.engines.vllm_backend`: both must agree on
the log-prob of a completion under the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def is_vision_model(path: str | Path) -> bool:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return "vision_config" in cfg


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A policy from a local directory (or a HF id already in the local cache)."""
    import transformers

    if Path(path).is_dir() and not is_vision_model(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor of a VLM (with the image budget when given), or the tokenizer of a text-only
    model. The engines get the same budget (``EngineSpec.min_pixels/max_pixels``), so both sides
    count the same image tokens."""
    import transformers

    if Path(path).is_dir() and not is_vision_model(path):
        return transformers.AutoTokenizer.from_pretrained(path)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    return transformers.AutoProcessor.from_pretrained(path, **pixels)


def completion_logprobs(
    model, input_ids: torch.Tensor, completion_start: int, **model_inputs
) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= completion_start, shape [B, T - start].

    ``model_inputs`` carries ``attention_mask``, ``pixel_values`` and ``image_grid_thw``; M-RoPE
    positions are left to the model.
    """
    if "image_grid_thw" in model_inputs and "mm_token_type_ids" not in model_inputs:
        model_inputs["mm_token_type_ids"] = mm_token_type_ids(model.config, input_ids)
    logits = model(input_ids=input_ids, **model_inputs).logits.float()
    logp = torch.log_softmax(logits[:, completion_start - 1 : -1], dim=-1)
    return logp.gather(-1, input_ids[:, completion_start:, None]).squeeze(-1)


def mm_token_type_ids(config, input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's modality map for M-RoPE: 1 at image placeholders, 2 at video ones, else 0."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types
