"""The model families ekipl trains, behind one registry (:data:`FAMILIES`, keyed by the HF config's
``model_type``).

What differs between families sits here and nowhere else in the learner:

* whether padding-free packing is exact for it (``packable``: transformers keeps attention within
  each packed sequence and, for the Qwen-VL families, takes M-RoPE positions with the text
  positions prepended as ``position_ids[0]``; each family is checked in tests/test_families.py);
* where its vision tower is (``vision``, for ``learner.freeze_vision``);
* how a micro-batch without images still runs the tower (:meth:`Family.dummy_image_hooks`, see
  :mod:`ekipl.learner.logprobs`): where image features enter the language model. Qwen2-VL and
  Qwen2.5-VL add them at the input embeddings; Qwen3-VL also adds its DeepStack features to the
  hidden states after the first decoder layers;
* how a tiny model of the family is built from a seed (:mod:`ekipl.models.tiny`): its config, model,
  image and video processor and processor classes, and the patch size.

A model type the registry does not name is refused at start-up (:func:`family_of` raises
:class:`UnsupportedModelError`, which the trainer reports naming ``model.path``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class UnsupportedModelError(ValueError):
    """A model type that no family of the registry names."""


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    title: str
    vision: bool = True
    packable: bool = True
    deepstack: bool = False  # Qwen3-VL: vision features also enter after the first decoder layers
    # Tiny builds (ekipl.models.tiny): transformers class names and the vision patch size.
    config_cls: str = ""
    model_cls: str = ""
    processor_cls: str = ""
    image_processor_cls: str = ""
    video_processor_cls: str = ""
    patch_size: int = 14

    def vision_tower(self, model):
        """The vision tower module (``learner.freeze_vision``), or None for a text-only model."""
        body = getattr(model, "model", None)
        return getattr(body, "visual", None) if self.vision else None

    def dummy_image_hooks(self, module, pixel_values, grid_thw) -> list:
        """(submodule, forward hook) pairs that run the vision tower on a dummy image and add its
        features with weight 0 where the family's real features enter the language model, so that a
        rank without images gathers and reduces the tower's parameters in the order a rank with
        images does (ZeRO-2 buckets gradients in arrival order). The tower runs in the embeddings'
        hook, after they are computed, as in the model's own forward."""
        body = module.model
        state: dict = {}

        def embeddings(mod, args, out):
            feats = body.get_image_features(
                pixel_values=pixel_values.to(out.device), image_grid_thw=grid_thw.to(out.device)
            )
            state["deepstack"] = list(getattr(feats, "deepstack_features", None) or [])
            return out + 0.0 * _total(feats.pooler_output).to(out.dtype)

        hooks = [(module.get_input_embeddings(), embeddings)]
        if self.deepstack:
            layers = body.language_model.layers

            def after_layer(i):
                def hook(mod, args, out):
                    extra = state["deepstack"][i] if i < len(state["deepstack"]) else None
                    return out if extra is None else out + 0.0 * _total(extra).to(out.dtype)

                return hook

            n = len(getattr(module.config.vision_config, "deepstack_visual_indexes", ()))
            hooks += [(layers[i], after_layer(i)) for i in range(min(n, len(layers)))]
        return hooks


def _total(tensors):
    if hasattr(tensors, "sum") and not isinstance(tensors, list | tuple):
        return tensors.float().sum()
    return sum(t.float().sum() for t in tensors)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "qwen2_vl",
            "Qwen2-VL",
            config_cls="Qwen2VLConfig",
            model_cls="Qwen2VLForConditionalGeneration",
            processor_cls="Qwen2VLProcessor",
            image_processor_cls="Qwen2VLImageProcessor",
            video_processor_cls="Qwen2VLVideoProcessor",
        ),
        Family(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            config_cls="Qwen2_5_VLConfig",
            model_cls="Qwen2_5_VLForConditionalGeneration",
            processor_cls="Qwen2_5_VLProcessor",
            image_processor_cls="Qwen2VLImageProcessor",
            video_processor_cls="Qwen2VLVideoProcessor",
        ),
        Family(
            "qwen3_vl",
            "Qwen3-VL",
            deepstack=True,
            config_cls="Qwen3VLConfig",
            model_cls="Qwen3VLForConditionalGeneration",
            processor_cls="Qwen3VLProcessor",
            image_processor_cls="Qwen2VLImageProcessor",
            video_processor_cls="Qwen3VLVideoProcessor",
            patch_size=16,
        ),
        Family(
            "qwen2", "Qwen2 (text only)", vision=False, config_cls="Qwen2Config", model_cls="Qwen2ForCausalLM"
        ),
    )
}


def family_of(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = ", ".join(f"{k} ({f.title})" for k, f in FAMILIES.items())
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {known}"
        ) from None


def model_type(path: str | Path) -> str:
    """A model directory's ``model_type`` (its config.json)."""
    return json.loads((Path(path) / "config.json").read_text()).get("model_type", "")


def family_of_model(model) -> Family:
    return family_of(model.config.model_type)
