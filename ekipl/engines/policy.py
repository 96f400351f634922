"""``PolicyEngine``: a Ray actor hosting one vLLM engine for the policy (thin: it wraps
:mod:`ekipl.engines.vllm_backend`). Auxiliary vLLM sources use the same actor without weight sync.
"""

from __future__ import annotations

import time

from ekipl.engines import vllm_backend as vb


class PolicyEngineError(RuntimeError):
    """The policy engine died or failed: training cannot go on without it."""


class PolicyEngine:
    def __init__(self, spec: vb.EngineSpec, name: str = "engine", gpus: float = 0.0):
        """``gpus``: the GPUs this actor asked Ray for; it stops here, saying why, when it cannot
        use CUDA (a multi-GPU engine asks for none itself: its vLLM workers hold the GPUs)."""
        import dataclasses

        from ekipl.engines.device import require_cuda
        from ekipl.models.resolve import on_node

        require_cuda(name, gpus)
        t0 = time.perf_counter()
        # A HF id is resolved here, on the node that runs the engine (never a driver's cache path).
        role, *rest = name.split("/")
        key = f"aux.{rest[0]}.model" if role == "aux" and rest else "model.path"
        spec = dataclasses.replace(spec, model=on_node(spec.model, spec.cache_dir, key))
        self.spec = spec
        self.llm = vb.start_engine(spec)
        self.banned = vb.placeholder_token_ids(self.llm)
        self.start_seconds = time.perf_counter() - t0
        self.weight_version = 0

    def ready(self) -> float:
        return self.start_seconds

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list:
        import ray

        return list(ray.get_gpu_ids())

    def generate(
        self,
        requests: list[vb.Request],
        n: int,
        temperature: float,
        max_tokens: int | list[int],
        seed: int | None = None,
        top_p: float = 1.0,
        ignore_eos: bool = False,
    ) -> list[list[vb.Completion]]:
        """``max_tokens``: one limit for every request, or one per request."""
        limits = vb.per_request(max_tokens, len(requests), "max_tokens")
        made = {  # one SamplingParams per distinct limit
            m: vb.sampling_params(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=m,
                seed=seed,
                ignore_eos=ignore_eos,
                banned_token_ids=self.banned,
            )
            for m in set(limits)
        }
        params = [made[m] for m in limits]
        return vb.generate(self.llm, requests, params, seed=seed)

    def score(self, prompt_token_ids: list[int], completion_ids: list[int], images=()) -> list[float]:
        return vb.score(self.llm, prompt_token_ids, completion_ids, images)

    def load_weights(self, path: str) -> int:
        """Load a safetensors file of full weights (written by the learner) into the running engine."""
        if not self.spec.enable_weight_sync:
            raise RuntimeError("this engine was started without weight sync (an auxiliary model?)")
        n = vb.load_weights_from_file(self.llm, path)
        self.weight_version += 1
        return n

    def load_weights_bytes(self, blob: bytes) -> int:
        """The same, from the file's bytes (an engine on another node than learner rank 0)."""
        import os
        import tempfile

        fd, path = tempfile.mkstemp(
            suffix=".safetensors", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            return self.load_weights(path)
        finally:
            os.remove(path)


def start_engine_actor(
    spec: vb.EngineSpec,
    name: str,
    num_cpus: float,
    num_gpus: float,
    resources: dict | None,
    share: int,
    placement=None,
    **ray_options,
):
    """One :class:`~ekipl.engines.policy.PolicyEngine` actor named ``name`` (``policy/R``,
    ``aux/NAME/R``), in its placement group bundle when ``placement`` is given. A multi-GPU engine's
    actor takes CPUs only: its vLLM workers take the GPUs of its bundles."""
    import dataclasses

    import ray

    bundles = placement.bundle_indices(name) if placement is not None else ()
    if bundles:
        spec = dataclasses.replace(spec, bundle_indices=bundles)
    gpus = 0.0 if spec.workers > 1 else num_gpus
    opts = dict(
        num_cpus=num_cpus,
        num_gpus=gpus,
        runtime_env=vb.actor_runtime_env(share=share, num_gpus=num_gpus, bundle_indices=bundles),
        **ray_options,
    )
    if resources:
        opts["resources"] = dict(resources)
    if placement is not None:
        opts["scheduling_strategy"] = placement.strategy(name)
    return ray.remote(PolicyEngine).options(**opts).remote(spec, name, gpus)
