"""LoRA for the learner (``learner.lora``), with peft: adapters on the language model's projections,
the vision tower excluded and frozen (EasyR1's ``exclude_modules: .*visual.*``).

* :func:`wrap` turns a transformers model into a ``PeftModel`` whose only trainable parameters are
  the adapters, so DeepSpeed keeps gradients and optimizer state for them alone.
* :func:`merged_units` lists what the engines load: every weight under its transformers name, a
  LoRA layer's weight merged, ``W + scale * B @ A`` (peft's own ``get_delta_weight``), so the engines
  need no LoRA support and the existing weight buffer carries them.
* The KL reference is the same model with the adapters switched off (``disable_adapter``): no second
  copy of the weights.
"""

from __future__ import annotations

import dataclasses

import torch

from ekipl.learner.config import LoraSettings


def wrap(model, settings: LoraSettings):
    """``model`` with LoRA adapters (peft); every base parameter frozen, the adapters trainable."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        exclude_modules=settings.exclude_modules or None,
        bias="none",
    )
    peft_model = get_peft_model(model, cfg)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(
            f"learner.lora.target_modules: none of {list(settings.target_modules)} is in the model"
        )
    return peft_model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model):
    """The transformers model under a DeepSpeed engine and/or a PeftModel."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft(model) else model


def _hf_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@dataclasses.dataclass
class Unit:
    """Parameters to gather together (ZeRO-3), the transformers-named tensors they make (each named
    with the parameter whose full shape and dtype it has) and how to make them once gathered."""

    params: list[torch.nn.Parameter]
    names: list[tuple[str, torch.nn.Parameter]]
    produce: object  # () -> [(name, tensor)]


def merged_units(peft_model) -> list[Unit]:
    """What the engines load, under transformers names: a LoRA layer's weight merged (and its bias
    as it is), every other parameter as it is. The adapters themselves are not among the names."""
    from peft.tuners.lora import LoraLayer

    units: list[Unit] = []
    covered: set[int] = set()
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        params = list(mod.parameters())
        covered.update(id(p) for p in params)
        names = [(_hf_name(f"{name}.weight"), base.weight)]
        if getattr(base, "bias", None) is not None:
            names.append((_hf_name(f"{name}.bias"), base.bias))

        def produce(mod=mod, base=base, names=names):
            weight = base.weight.detach() + mod.get_delta_weight("default").to(base.weight.dtype)
            return [(names[0][0], weight), *((n, p.detach()) for n, p in names[1:])]

        units.append(Unit(params, names, produce))
    for name, p in peft_model.named_parameters():
        if id(p) not in covered:
            units.append(
                Unit([p], [(_hf_name(name), p)], lambda name=name, p=p: [(_hf_name(name), p.detach())])
            )
    return units


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapters in peft's own layout (``get_peft_model_state_dict``); full parameters only."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }
