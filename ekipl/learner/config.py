"""Learner configuration (registered with Hydra's ConfigStore by ekipl.config)."""

from __future__ import annotations

import dataclasses

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class LoraSettings:
    rank: int = 0  # 0: full-parameter training
    alpha: float = 16.0
    dropout: float = 0.0
    # module names (peft's target_modules) the adapters go on; the vision tower is never one of them
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    exclude_modules: str = r".*visual.*"

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if self.rank < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"learner.lora: rank must be >= 0, alpha > 0 and dropout in [0, 1); got rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )
        if self.rank and not self.target_modules:
            raise ValueError("learner.lora.target_modules: name at least one module")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclasses.dataclass
class LearnerConfig:
    world_size: int = 2
    zero_stage: int = 2
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    # Token-budget micro-batches (verl's dynamic batch size): each rank's rows, sorted by length, are
    # packed greedily so that rows x longest row <= this budget (0: micro_batch_size rows each).
    max_tokens_per_micro_batch: int = 0
    # Padding-free: each micro-batch's rows run as one row, position ids restarting at each sequence
    # and attention kept within it (transformers' packed sequences; the families marked packable).
    # With max_tokens_per_micro_batch, the budget bounds a micro-batch's total tokens.
    pack_sequences: bool = False
    # The LM head and log-softmax run on completion positions only, this many rows at a time (each
    # chunk's logits recomputed in the backward pass; two or three [rows, V] fp32 buffers at the
    # peak, ~0.5 GB at 256 rows of Qwen2's 151,936); 0: all completion positions at once.
    logits_chunk_tokens: int = 256
    epochs: int = 1  # μ inner epochs over each batch
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    # The vision tower's own learning rate (its parameter group in the optimizer; None: learner.lr),
    # as VLM fine-tuning recipes train a ViT slower than the language model.
    vision_lr: float | None = None
    bf16: bool = False  # GPU only; CPU trains in fp32
    sync_bucket_mb: int = 64
    # DeepSpeed's communication overlap: the gradient reduction runs beside the backward pass into
    # one contiguous buffer (the GPU presets turn both on; on CPU gloo gains nothing from them).
    overlap_comm: bool = False
    contiguous_gradients: bool = False
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    # Custom Ray resources each rank needs, e.g. {learner_node: 1} to keep ranks on labelled nodes.
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    # LoRA (peft) on the language model; rank 0: full-parameter training. See ekipl.learner.lora.
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)

    def __post_init__(self):
        if isinstance(self.lora, dict):
            known = {f.name for f in dataclasses.fields(LoraSettings)}
            unknown = sorted(set(self.lora) - known)
            if unknown:
                raise ValueError(f"learner.lora: unknown key(s) {unknown}; known: {sorted(known)}")
            self.lora = LoraSettings(**self.lora)
        if self.world_size < 1:
            raise ValueError(f"learner.world_size must be >= 1, got {self.world_size}")
        if self.zero_stage not in (1, 2, 3):
            # Stage 0 hands the gradients to a plain optimizer with no overflow check: a NaN
            # gradient would reach the weights instead of skipping the step.
            raise ValueError(f"learner.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.epochs < 1:
            raise ValueError("learner.micro_batch_size and learner.epochs must be >= 1")
        if self.max_tokens_per_micro_batch < 0 or self.logits_chunk_tokens < 0:
            raise ValueError(
                "learner.max_tokens_per_micro_batch and learner.logits_chunk_tokens must be >= 0"
            )
        if self.lr <= 0:
            raise ValueError(f"learner.lr must be > 0, got {self.lr}")
        if self.vision_lr is not None:
            if self.vision_lr <= 0:
                raise ValueError(f"learner.vision_lr must be > 0, got {self.vision_lr}")
            if self.freeze_vision or self.lora.enabled:
                raise ValueError(
                    "learner.vision_lr: the vision tower is not trained "
                    f"({'learner.freeze_vision' if self.freeze_vision else 'learner.lora leaves it frozen'})"
                )

    def reference_config(self) -> dict:
        """DeepSpeed's config of the frozen reference under ZeRO-3: partitioned like the policy, no
        optimizer (forward passes only)."""
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.micro_batch_size * self.world_size,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def deepspeed_config(self, n_micro: int) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": n_micro,
            "train_batch_size": self.micro_batch_size * n_micro * self.world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {
                "stage": self.zero_stage,
                "overlap_comm": self.overlap_comm,
                "contiguous_gradients": self.contiguous_gradients,
            },
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": self.lr,
                    "betas": list(self.betas),
                    "eps": self.adam_eps,
                    "weight_decay": self.weight_decay,
                    "torch_adam": True,
                },
            },
            # bf16 ZeRO-1/2 skips a step with a non-finite gradient only when asked to.
            "bf16": {"enabled": self.bf16, "check_grad_overflow": True},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
