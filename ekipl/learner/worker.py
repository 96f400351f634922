"""One learner rank: a DeepSpeed ZeRO engine around the policy, the objective, and weight export.

:class:`Learner` is plain Python; :class:`~ekipl.learner.group.LearnerGroup` runs it as Ray
actors, and all its ranks call each method together (they hold collectives).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ekipl.algo import objective as O
from ekipl.learner.batch import Batch
from ekipl.learner.config import LearnerConfig
from ekipl.learner.logprobs import n_chunks, require_packable, sequence_logprobs
from ekipl.models.families import family_of_model

log = logging.getLogger(__name__)


def _float(x) -> float:
    """A DeepSpeed scalar (a tensor, a float, or None before any step) as a float (NaN for None)."""
    return float("nan") if x is None else float(x)


def param_groups(model, vision_lr: float | None) -> list:
    """The optimizer's trainable parameters: one group at ``learner.lr``, or, with ``vision_lr``,
    the language model's (first: its lr is the one logged) and the vision tower's at its own rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    if vision_lr is None:
        return params
    tower = family_of_model(model).vision_tower(model)
    if tower is None:
        raise ValueError(f"learner.vision_lr: {model.config.model_type!r} has no vision tower")
    vision = {id(p) for p in tower.parameters()}
    return [
        {"params": [p for p in params if id(p) not in vision]},
        {"params": [p for p in params if id(p) in vision], "lr": vision_lr},
    ]


class _Means:
    """Running means of per-micro-batch metrics, each over the micro-batches that report it, each
    micro-batch weighted by the tokens its value is a mean over (``weights``; 1 where none is given),
    so that the result is the mean over the rank's tokens whatever its micro-batch layout."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, metrics: dict, weights: dict[str, float] | None = None) -> None:
        for k, v in metrics.items():
            w = (weights or {}).get(k, 1.0)
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * w
            self.counts[k] = self.counts.get(k, 0.0) + w

    def result(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items() if self.counts[k] > 0}


@dataclass
class _Tally:
    """What one update accumulates over its micro-batches."""

    means: _Means = field(default_factory=_Means)
    old_logp: dict[int, torch.Tensor] = field(default_factory=dict)  # π_old per micro-batch
    padded: int = 0
    real: int = 0
    nonfinite: int = 0


def rollout_logprob_diff(logp: torch.Tensor, mb: Batch) -> dict:
    """Mean |log π_learner − log π_engine| over the policy's sampled tokens, where the engine reported
    them (first epoch: the learner's π_old). ~1e-4 when weights, tokens, masks and image features
    agree between engine and learner; one update stale with one-step-off rollout."""
    if mb.sampled_mask is None:
        return {}
    sm = mb.sampled_mask  # placed by the completion mask (collate): a subset of it
    if float(sm.sum()) == 0:
        return {}
    return {"rollout_logprob_diff": ((logp.detach() - mb.sampled_logp).abs() * sm).sum() / sm.sum()}


def _weighted(
    metrics: dict, ent: torch.Tensor, logp: torch.Tensor, mb: Batch, mask: torch.Tensor, first_epoch: bool
) -> tuple[dict, dict[str, float]]:
    """A micro-batch's metrics with the entropy (and, in the first epoch, the engine-vs-learner
    log-prob gap) added, and the token counts each is a mean over (see :class:`_Means`)."""
    metrics["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1.0)
    weights = O.metric_tokens(mask, mb.is_aux)
    weights["entropy"] = weights["pg_loss"]  # a mean over the same completion tokens
    if first_epoch and (diff := rollout_logprob_diff(logp, mb)):
        metrics.update(diff)
        weights["rollout_logprob_diff"] = float(mb.sampled_mask.sum())
    for k in metrics:  # the mismatch metrics are means over the tokens with engine log-probs
        if k.startswith("rollout_corr/"):
            weights[k] = float(mb.sampled_mask.sum())
    return metrics, weights


def micro_batches(n_rows: int, size: int, n_micro: int) -> list[list[int]]:
    """``n_micro`` lists of row indices (the last ones may be empty: a rank with fewer rows)."""
    rows = list(range(n_rows))
    out = [rows[i * size : (i + 1) * size] for i in range(n_micro)]
    return out


def pack_by_tokens(lengths: list[int], budget: int, packed: bool = False) -> list[list[int]]:
    """Token-budget micro-batches (verl's dynamic batch size): rows sorted by length, longest first.
    Padded (``packed`` False): packed greedily so that each micro-batch's rows x longest row stays
    within ``budget``; sorting keeps the padding small. Packed into one padding-free row: first fit,
    each micro-batch's total length within ``budget``. A row longer than the budget gets a
    micro-batch of its own."""
    out: list[list[int]] = []
    load: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        if packed:
            fit = next((k for k, used in enumerate(load) if used + lengths[i] <= budget), None)
        else:  # the last micro-batch's first row is its longest
            fit = len(out) - 1 if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget else None
        if fit is None:
            out.append([i])
            load.append(lengths[i])
        else:
            out[fit].append(i)
            load[fit] += lengths[i]
    return out


def plan_rows(lengths: list[int], cfg: LearnerConfig) -> list[list[int]]:
    """One rank's micro-batches (lists of row indices) for rows of these lengths."""
    if cfg.max_tokens_per_micro_batch:
        return pack_by_tokens(lengths, cfg.max_tokens_per_micro_batch, cfg.pack_sequences)
    n = max(1, math.ceil(len(lengths) / cfg.micro_batch_size))
    return [r for r in micro_batches(len(lengths), cfg.micro_batch_size, n) if r]


def _import_deepspeed_muon_uncompiled() -> None:
    """DeepSpeed imports its Muon module in every ZeRO setup and step, even for AdamW, and that
    module wraps its kernels in ``torch.compile`` at import, which imports torch._inductor: 3.9 s
    of a rank's 9.4 s setup on 2 CPU cores, in every rank of every run. ekipl's optimizer is always
    AdamW (LearnerConfig.deepspeed_config), so those kernels never run: the module is imported here
    once with DeepSpeed's compile decorator as the identity, and DeepSpeed's later imports find it."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    compile_ = compiler.compile
    compiler.compile = lambda: lambda fn: fn
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imports original_muon)
    finally:
        compiler.compile = compile_


def _zero_init(cfg: LearnerConfig, ds_config: dict):
    """Under ZeRO-3 (full-parameter training), transformers' ``HfDeepSpeedConfig``: while the object
    lives, ``from_pretrained`` builds the model inside DeepSpeed's ``zero.Init`` and loads each
    weight into its shards, so no rank ever holds the whole model. None otherwise (LoRA wraps a
    whole frozen base; ZeRO-1/2 keep whole weights on every rank anyway)."""
    if cfg.zero_stage != 3 or cfg.lora.enabled:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


class Learner:
    """One rank. Construction is cheap; :meth:`setup` joins the process group and builds the
    DeepSpeed engine (rank 0's :meth:`rendezvous` says where the group meets)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        cfg: LearnerConfig,
        objective: O.ObjectiveConfig,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        self.rank, self.world_size, self.model_path, self.seed = rank, world_size, model_path, seed
        self.cache_dir = cache_dir  # where a HF id model_path is looked up on this rank's node
        self.cfg, self.objective = cfg, objective
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.sync_dir = tempfile.mkdtemp(prefix=f"ekipl-sync-r{rank}-", dir=shm)  # on this rank's node
        self._buffer = None  # rank 0's weight-sync buffer, laid out at the first sync

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it (called on rank 0)."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        try:
            import ray

            addr = ray.util.get_node_ip_address()
        except Exception:  # outside Ray
            addr = "127.0.0.1"
        return addr, port

    def setup(self, master_addr: str, master_port: int) -> None:
        from ekipl.engines.device import require_cuda
        from ekipl.models.resolve import on_node

        rank, world_size, cfg, objective = self.rank, self.world_size, self.cfg, self.objective
        require_cuda(f"learner rank {rank}", cfg.num_gpus_per_worker)  # never a silent CPU fallback
        self.model_path = model_path = on_node(self.model_path, self.cache_dir)  # on this rank's node
        seed = self.seed
        gpus = torch.cuda.device_count()
        local_rank = rank % gpus if gpus else 0
        if not gpus:
            # Ray gives an actor one thread per CPU it reserved (1 by default); the learner steps
            # while the engines wait, so on CPU its ranks share the machine's cores instead.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
        )
        import deepspeed

        _import_deepspeed_muon_uncompiled()

        from ekipl.models import hf

        self.device = torch.device("cuda", local_rank) if gpus else torch.device("cpu")
        if not gpus:
            # On CPU DeepSpeed would JIT-compile a shared-memory all-reduce op on first use (1-2
            # minutes, and a C++ compiler). Only its inference all-reduce uses that op; ZeRO's
            # collectives go through torch.distributed (gloo) either way.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if gpus else "gloo", auto_mpi_discovery=False)
        torch.manual_seed(seed)
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self._n_micro = 1
        ds_config = cfg.deepspeed_config(self._n_micro)
        self._zero_init = _zero_init(cfg, ds_config)  # while it lives, models load sharded (ZeRO-3)
        model = hf.load_model(model_path, dtype=dtype)
        # whether the weights arrived as ZeRO-3 shards (zero.Init), before DeepSpeed wrapped them
        self._loaded_sharded = all(hasattr(p, "ds_id") for p in model.parameters())
        if cfg.pack_sequences:
            require_packable(model)
        tower = family_of_model(model).vision_tower(model) if cfg.freeze_vision else None
        if tower is not None:
            for p in tower.parameters():
                p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.lora.enabled:  # adapters on the language model; the base (and the ViT) frozen
            from ekipl.learner.lora import wrap

            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
            model = wrap(model, cfg.lora)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.vision_lr), config=ds_config
        )
        self.ref = None
        if objective.kl_coef > 0 and not cfg.lora.enabled:  # β = 0 skips the reference entirely;
            # with LoRA it is the same model with its adapters off (logprobs(reference=True))
            self.ref = self._reference(deepspeed, model_path, dtype)

    def _reference(self, deepspeed, model_path: str, dtype) -> torch.nn.Module:
        """The frozen reference policy. Under ZeRO-3 it is sharded like the policy (loaded under
        zero.Init, then a ZeRO-3 engine without an optimizer: forward passes gather each layer as
        the policy's do); under ZeRO-1/2 each rank holds a whole copy."""
        from ekipl.models import hf

        ref = hf.load_model(model_path, dtype=dtype).eval().requires_grad_(False)
        if self.cfg.zero_stage != 3:
            return ref.to(self.device)
        self._ref_engine, _, _, _ = deepspeed.initialize(model=ref, config=self.cfg.reference_config())
        return self._ref_engine.module.eval()

    def held_parameters(self) -> dict[str, int]:
        """Parameters this rank holds of the policy and of the reference, against their totals (under
        ZeRO-3 a shard of each: ``ds_tensor`` is the rank's partition), and whether the policy was
        loaded as shards (zero.Init) rather than whole."""

        def held(module) -> tuple[int, int]:
            if module is None:
                return 0, 0
            ps = list(module.parameters())
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in ps)
            return local, sum(getattr(p, "ds_numel", p.numel()) for p in ps)

        (pl, pt), (rl, rt) = held(self.engine.module), held(self.ref)
        return {
            "policy_local": pl,
            "policy_total": pt,
            "reference_local": rl,
            "reference_total": rt,
            "loaded_sharded": int(self._loaded_sharded),
        }

    # -------------------------------------------------------------------------------------------
    def _zero3_group(self) -> bool:
        return self.cfg.zero_stage == 3 and self.world_size > 1

    def _head_chunks(self, mb: Batch) -> int:
        """Under ZeRO-3 on several ranks: the most LM-head chunks any rank has in this micro-batch
        (every rank must call the head as often, its gathers being collectives); else 0."""
        if not self._zero3_group():
            return 0
        import torch.distributed as dist

        n = torch.tensor(
            [n_chunks(int(mb.completion_mask.sum()), self.cfg.logits_chunk_tokens)], device=self.device
        )
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return int(n.item())

    def _to_device(self, b: Batch) -> Batch:
        for f in (
            "input_ids",
            "attention_mask",
            "completion_mask",
            "advantages",
            "is_aux",
            "pixel_values",
            "image_grid_thw",
            "mm_token_type_ids",
            "old_logp",
            "ref_logp",
            "sampled_logp",
            "sampled_mask",
            "dummy_pixel_values",
            "dummy_grid_thw",
        ):
            t = getattr(b, f)
            if t is not None:
                setattr(b, f, t.to(self.device))
        return b

    def _plan(self, batch: Batch, plan: list[list[int]] | None) -> list[list[int]]:
        """The micro-batches: ``plan`` as the group laid it out (the same count on every rank), or,
        for a lone rank driven directly (bench/perf/gpu.py), this batch's own :func:`plan_rows`."""
        return plan if plan is not None else plan_rows(batch.attention_mask.sum(-1).tolist(), self.cfg)

    @torch.no_grad()
    def logprobs(
        self, batch: Batch, plan: list[list[int]] | None = None, reference: bool = False
    ) -> torch.Tensor:
        """Log-probs [B, L-1] of this rank's rows (in row order), under the policy (or the frozen
        reference)."""
        import contextlib

        adapters_off = reference and self.cfg.lora.enabled
        model = self.engine.module if self.ref is None or not reference else self.ref
        out = torch.zeros(len(batch), batch.input_ids.shape[1] - 1)
        with model.disable_adapter() if adapters_off else contextlib.nullcontext():
            for rows in self._plan(batch, plan):
                if not rows and not self._zero3_group():
                    continue
                # ZeRO-3 on several ranks: a rank with an empty micro-batch still runs one (on row 0,
                # its result unused), or the others would wait in its parameter gathers
                mb = self._to_device(batch.select(rows or [0]))
                lp, _ = sequence_logprobs(
                    model,
                    mb,
                    chunk_tokens=self.cfg.logits_chunk_tokens,
                    pack=self.cfg.pack_sequences,
                    min_chunks=self._head_chunks(mb),
                )
                if rows:
                    out[rows, : lp.shape[1]] = lp.cpu()
        return out

    def update(
        self,
        batch: Batch,
        plan: list[list[int]] | None = None,
        global_tokens: float = 0.0,
        global_seqs: float = 0.0,
        max_len: int = 0,
        sft: bool = False,
    ) -> dict:
        """μ epochs over this rank's rows, one optimizer step per epoch. Returns averaged metrics.

        ``plan``: the micro-batches (see :meth:`_plan`); every rank must run as many.
        ``sft``: the CoT-SFT loss (negative log-likelihood of the completions) instead of the RL one.
        """
        self.engine.train()
        plan = self._plan(batch, plan)
        n_micro = len(plan)
        if n_micro != self._n_micro:
            self.engine.set_train_batch_size(self.cfg.micro_batch_size * n_micro * self.world_size)
            self._n_micro = n_micro
        totals = dict(global_tokens=global_tokens, global_seqs=global_seqs, max_len=max_len)
        tally = _Tally()
        grad_norms: list[float] = []
        skipped = 0
        t0 = time.perf_counter()
        for epoch in range(self.cfg.epochs):
            for j, rows in enumerate(plan):
                # The epoch's last micro-batch is the accumulation boundary. DeepSpeed would place it
                # by a micro-step counter that runs across steps, which is off by some micro-batches
                # once their number per step changes (it follows the batch: tied groups are dropped).
                self.engine.set_gradient_accumulation_boundary(j == n_micro - 1)
                self._micro_step(batch, rows, j, epoch == 0, tally, sft, totals)
            # The whole batch's gradient norm before clipping (DeepSpeed reduces it over the ranks).
            grad_norms.append(_float(self.engine.get_global_grad_norm()))
            if not self.engine.was_step_applied():  # the same decision on every rank
                skipped = 1
                break  # later epochs would start from the same weights and fail the same way
        out = {f"actor/{k}": v for k, v in tally.means.result().items()}
        out["token_weights"] = {f"actor/{k}": w for k, w in tally.means.counts.items()}  # for LearnerGroup
        out["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["actor/padding_frac"] = tally.padded / max(tally.real, 1)  # padded positions per real token
        out["actor/micro_batches"] = float(n_micro)
        out["actor/lr"] = float(self.engine.get_lr()[0])
        out["actor/skipped_step"] = float(skipped)
        out["actor/nonfinite_loss"] = float(tally.nonfinite)
        out["timing/update_rank"] = time.perf_counter() - t0
        return out

    def _micro_step(
        self, batch: Batch, rows: list[int], j: int, first_epoch: bool, tally: _Tally, sft: bool, totals: dict
    ) -> None:
        """The forward and backward of micro-batch ``j`` (``rows`` empty: a zero loss on one row, so
        that every rank runs as many micro-batches as the others); what it measures goes to ``tally``."""
        empty = not rows
        mb = self._to_device(batch.select(rows or [0]))
        if first_epoch and not empty:
            pad, tokens = mb.padding()
            tally.padded += pad * (not self.cfg.pack_sequences)
            tally.real += tokens
        logp, ent = sequence_logprobs(
            self.engine,
            mb,
            with_entropy=True,
            chunk_tokens=self.cfg.logits_chunk_tokens,
            pack=self.cfg.pack_sequences,
            min_chunks=self._head_chunks(mb),
        )
        # π_old: the weights' log-probs before this step's first optimizer step. Every micro-batch of
        # the first epoch runs before that step, so its own detached log-probs are π_old, and no
        # separate forward pass is needed (unless the caller supplied ``old_logp``).
        if mb.old_logp is None:
            mb.old_logp = tally.old_logp.setdefault(j, logp.detach())
        mask = mb.completion_mask * (0.0 if empty else 1.0)
        loss, metrics = self._loss(logp, mb, mask, sft, **totals)
        if empty:
            loss = loss * 0.0
        tally.nonfinite += int(not torch.isfinite(loss.detach()).item())
        # engine.backward divides by the accumulation steps and the ranks' gradients are averaged:
        # scale so that the sum over ranks and micro-batches is the whole batch's loss.
        self.engine.backward(loss * float(self.world_size * self._n_micro))
        # DeepSpeed convention: step() after every micro-batch; it applies the optimizer only at the
        # accumulation boundary (the last micro-batch of the epoch). There, a non-finite global
        # gradient norm (any rank, any micro-batch) makes every rank skip the optimizer step and drop
        # the gradients: the weights stay as they were.
        self.engine.step()
        if not empty:
            tally.means.add(*_weighted(metrics, ent, logp, mb, mask, first_epoch))

    def _loss(
        self, logp: torch.Tensor, mb: Batch, mask: torch.Tensor, sft: bool, **totals
    ) -> tuple[torch.Tensor, dict]:
        """A micro-batch's share of the whole batch's loss (``totals``: the whole batch's token and
        sequence counts and its longest completion, for the normalisation) and its metrics."""
        if sft:
            return O.sft_loss(logp, mask, global_tokens=totals["global_tokens"])
        return O.policy_loss(
            self.objective,
            logp,
            mb.old_logp,
            mb.advantages,
            mask,
            mb.is_aux,
            mb.ref_logp,
            behaviour_logp=mb.sampled_logp,
            behaviour_mask=mb.sampled_mask,
            **totals,
        )

    # -------------------------------------------------------------------------------------------
    def _units(self) -> list:
        """What an export holds, under transformers names: every parameter, or with LoRA the merged
        weights (:func:`ekipl.learner.lora.merged_units`)."""
        from ekipl.learner.lora import Unit, merged_units

        module = self.engine.module
        if self.cfg.lora.enabled:
            return merged_units(module)
        return [Unit([p], [(n, p)], lambda n=n, p=p: [(n, p)]) for n, p in module.named_parameters()]

    def _gathered(self):
        """Yield (name, full tensor) for every weight of :meth:`_units`; under ZeRO-3 the partitioned
        parameters are gathered bucket by bucket (``sync_bucket_mb``), so no rank ever materialises
        more than one bucket beyond its shard. All ranks must iterate it together."""
        import deepspeed

        budget = self.cfg.sync_bucket_mb * 2**20
        buckets: list[list] = [[]]
        size = 0
        for unit in self._units():
            if size >= budget:
                buckets.append([])
                size = 0
            buckets[-1].append(unit)
            size += sum(
                (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in unit.params
            )
        for bucket in buckets:
            params = [p for unit in bucket for p in unit.params]
            with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
                for unit in bucket:
                    yield from unit.produce()

    def export_weights(self, path: str | None = None) -> tuple[str | None, int]:
        """Write the full weights as safetensors, on rank 0's node. Returns (path, bytes) on rank 0.

        With ``path`` (an export or a checkpoint's copy): a new file there. Without (weight sync):
        rank 0's :class:`~ekipl.learner.weight_buffer.WeightBuffer` in its shared-memory sync dir,
        rewritten in place, whose path stays the same from sync to sync. Non-finite weights raise
        ``FloatingPointError`` before any engine is told to read them.
        """
        if path is not None:
            return self._save_file(path)
        from ekipl.learner.weight_buffer import WeightBuffer, layout_of

        buf = None
        if self.rank == 0:
            layout = layout_of([pair for unit in self._units() for pair in unit.names])
            buf = self._buffer
            if buf is None or buf.layout != layout:
                buf = self._buffer = WeightBuffer(os.path.join(self.sync_dir, "weights.safetensors"), layout)
        bad = []
        for name, p in self._gathered():
            if buf is not None and not buf.write(name, p):
                bad.append(name)
        if self.rank != 0:
            return None, 0
        if bad:  # never hand NaN/inf weights to an engine
            raise FloatingPointError(f"non-finite values in {len(bad)} weight tensor(s), e.g. {bad[:3]}")
        return buf.path, buf.nbytes

    def _save_file(self, path: str) -> tuple[str | None, int]:
        from safetensors.torch import save_file

        full = {}
        for n, p in self._gathered():  # every rank iterates: the gathers are collectives
            if self.rank == 0:
                full[n] = p.detach().to("cpu", copy=True).contiguous()
        if self.rank != 0:
            return None, 0
        bad = [n for n, t in full.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # never write NaN/inf weights into an export
            raise FloatingPointError(f"non-finite values in {len(bad)} weight tensor(s), e.g. {bad[:3]}")
        tmp = f"{path}.tmp"
        save_file(full, tmp)
        os.replace(tmp, path)
        return path, sum(t.numel() * t.element_size() for t in full.values())

    def export_adapter(self, out_dir: str) -> str | None:
        """With LoRA: the adapters in peft's layout (``adapter_config.json``, ``adapter_model.safetensors``)
        under ``out_dir``, written by rank 0 (all ranks gather them together). None without LoRA."""
        if not self.cfg.lora.enabled:
            return None
        import deepspeed
        from safetensors.torch import save_file

        from ekipl.learner.lora import adapter_state

        module = self.engine.module
        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, enabled=self.cfg.zero_stage == 3):
            state = adapter_state(module) if self.rank == 0 else {}
        if self.rank != 0:
            return None
        os.makedirs(out_dir, exist_ok=True)
        cfg = module.peft_config["default"]
        cfg.base_model_name_or_path = self.model_path
        cfg.save_pretrained(out_dir)
        save_file(state, os.path.join(out_dir, "adapter_model.safetensors"))
        return out_dir

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters and the elements of this rank's optimizer state (Adam's first
        moment; 0 before the first step): with LoRA, the adapters' alone."""
        module = self.engine.module
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        state = getattr(inner, "state", {})
        return {
            "trainable": sum(
                getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad
            ),
            "total": sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
            "optimizer_elements": sum(s["exp_avg"].numel() for s in state.values() if "exp_avg" in s),
        }

    def read_file(self, path: str) -> bytes:
        """A file's bytes (weights for engines on other nodes travel through Ray's object store)."""
        with open(path, "rb") as f:
            return f.read()

    def cleanup(self) -> None:
        import shutil

        self._buffer = None  # unmap it before the file goes
        shutil.rmtree(self.sync_dir, ignore_errors=True)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed's checkpoint of this rank (module, ZeRO optimizer partition) under ``path``;
        with LoRA the frozen base is left out (it is the model path's), only the adapters and their
        optimizer state are written."""
        lora = self.cfg.lora.enabled
        self.engine.save_checkpoint(path, tag="ds", save_latest=False, exclude_frozen_parameters=lora)

    def load_checkpoint(self, path: str) -> None:
        """Restore what :meth:`save_checkpoint` wrote (the same world size and ZeRO stage)."""
        strict = not self.cfg.lora.enabled  # LoRA: the checkpoint holds the adapters alone
        load_path, _ = self.engine.load_checkpoint(path, tag="ds", load_module_strict=strict)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path}")

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list:
        import ray

        return list(ray.get_gpu_ids())

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (all ranks must call; for tests and checkpoints)."""
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "w.safetensors")
            self.export_weights(path)
            return load_file(path) if self.rank == 0 else {}
