"""Shared fixtures. Slow things (tiny model builds, vLLM engines) are built once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # shared test helpers (openai_stub) import by name


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """Where tiny models are built: $EKIPL_CACHE if set (fast re-runs), else a session temp dir."""
    if os.environ.get("EKIPL_CACHE"):
        return None  # build_tiny's default: $EKIPL_CACHE/models
    return tmp_path_factory.mktemp("models", numbered=False)  # EKIPL_CACHE=its parent finds them


@pytest.fixture(scope="session")
def tiny_vlm(model_root):
    from ekipl.models.tiny import build_tiny

    return build_tiny("tiny-qwen2-vl", seed=0, root=model_root)


@pytest.fixture(scope="session")
def tiny_vlm_b(model_root):
    from ekipl.models.tiny import build_tiny

    return build_tiny("tiny-qwen2-vl-b", seed=0, root=model_root)


@pytest.fixture(scope="session")
def tiny_lm(model_root):
    from ekipl.models.tiny import build_tiny

    return build_tiny("tiny-qwen2", seed=0, root=model_root)


@pytest.fixture(scope="session")
def vllm_engines():
    """A session-wide cache of in-process vLLM engines, keyed by model path (one start each)."""
    from ekipl.engines import vllm_backend as vb

    engines: dict[str, object] = {}

    def get(path):
        key = str(path)
        if key not in engines:
            engines[key] = vb.start_engine(vb.EngineSpec(model=key, dtype="float32", seed=0))
        return engines[key]

    yield get
    engines.clear()


@pytest.fixture
def red_image():
    from PIL import Image

    return Image.new("RGB", (96, 80), (200, 30, 30))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (logical CPUs > cores: actors are mostly idle)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def counting_data(tmp_path_factory):
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.synth import make_dataset

    out = tmp_path_factory.mktemp("counting")
    paths = make_dataset("counting", out, n_train=8, n_test=4, seed=0)
    return load_task_file(paths["train"])


@pytest.fixture(scope="session")
def policy_router(ray_local, tiny_vlm):
    """One policy vLLM engine in a Ray actor (weight sync enabled), shared by all tests."""
    from ekipl.engines import vllm_backend as vb
    from ekipl.rollout.policy import PolicyRouter

    router = PolicyRouter(vb.EngineSpec(model=str(tiny_vlm), dtype="float32", seed=0), replicas=1)
    router.ready()
    yield router
    for a in router.actors:
        ray_local.kill(a)


class AuxSourceHolder:
    """The session's auxiliary vLLM source, started on first use; a test that killed its actor and
    does not need it back retires it (no restart to wait for or to pay for), and the next user
    gets a new one."""

    def __init__(self, model):
        self.model, self.src = model, None

    def get(self):
        from ekipl.rollout.sources import SourceConfig, VllmSource

        if self.src is None:
            cfg = SourceConfig(
                name="aux_b", kind="vllm", model=str(self.model), k=2, max_tokens=24, temperature=1.0
            )
            self.src = VllmSource(cfg)
        self.src.ready()  # a killed actor: wait for Ray's restart
        return self.src

    def retire(self):
        if self.src is not None:
            self.src.shutdown()
            self.src = None


@pytest.fixture(scope="session")
def aux_holder(ray_local, tiny_vlm_b):
    holder = AuxSourceHolder(tiny_vlm_b)
    yield holder
    holder.retire()


@pytest.fixture
def aux_vlm_source(aux_holder):
    """An auxiliary vLLM source on the second tiny VLM (its own tokenizer), shared by all tests."""
    return aux_holder.get()


@pytest.fixture
def stub_server():
    """A local OpenAI-compatible endpoint (tests/openai_stub.py)."""
    from openai_stub import Stub

    stub = Stub()
    yield stub
    stub.close()
