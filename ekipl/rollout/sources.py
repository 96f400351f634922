"""Auxiliary action sources behind one interface.

Each source is named in config and has its own samples-per-prompt ``k``, temperature and replicas,
so it scales on its own. ``generate(samples)`` returns, for each sample, a list of completion texts
(the coordinator re-tokenizes them with the policy's tokenizer and scores them).

* ``vllm``:    Ray actors hosting any vLLM-supported VLM (:class:`~ekipl.engines.policy.PolicyEngine`
  without weight sync), each with its own placement; Ray restarts a dead actor.
* ``openai``:  an OpenAI-compatible chat endpoint (GPT-4o, Gemini's compatible endpoint, a remote
  vLLM server), with a concurrency limit, retries with backoff and a timeout. The key is read from
  the environment variable named in config and never logged.
* ``dataset``: replays the sample's recorded ``cot`` (Reason-RFT-CoT's GPT-4o traces, offline).
* ``hf``:      transformers ``generate`` in-process, a fallback where vLLM is absent.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import os
import random
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from ekipl.engines import vllm_backend as vb
from ekipl.tasks.prompts import build_messages, render_prompt
from ekipl.tasks.sample import Sample

log = logging.getLogger(__name__)

KINDS = ("vllm", "openai", "dataset", "hf")


@dataclasses.dataclass
class SourceConfig(vb.EngineKeys):
    """One auxiliary source (``aux.NAME.*``); a vllm source's engine settings are
    :class:`~ekipl.engines.vllm_backend.EngineKeys` (unset: the device's defaults)."""

    name: str = "aux"
    kind: str = "dataset"
    k: int = 1
    temperature: float = 0.9
    top_p: float = 1.0
    max_tokens: int = 512
    model: str = ""  # local path or model id (vllm, hf, openai)
    replicas: int = 1
    system_prompt: bool = False
    # vllm placement
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = dataclasses.field(default_factory=dict)
    max_model_len: int = 2048
    # vllm/hf: the image budget and vLLM's multimodal cache (None: the policy's model.* values)
    min_pixels: int | None = None
    max_pixels: int | None = None
    mm_cache_gb: float | None = None
    # openai
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 0.5
    # any source: a call that takes longer counts as hung
    call_timeout_s: float = 600.0
    # any source: the price of 1,000 generated tokens, for aux/cost_usd/<name> (0: free or unknown)
    price_per_1k_tokens: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"aux.{self.name}.kind: unknown {self.kind!r}; known: {KINDS}")
        if self.k < 1 or self.replicas < 1:
            raise ValueError(f"aux.{self.name}: k and replicas must be >= 1")
        if self.price_per_1k_tokens < 0:
            raise ValueError(f"aux.{self.name}.price_per_1k_tokens must be >= 0")
        if self.kind in ("vllm", "hf") and not self.model:
            raise ValueError(f"aux.{self.name}.model: a {self.kind} source needs a model path or id")
        local = self.model.startswith(("/", "./", "../", "~"))  # otherwise a HF id or a tiny model name
        if self.kind in ("vllm", "hf") and local and not os.path.isdir(os.path.expanduser(self.model)):
            raise ValueError(f"aux.{self.name}.model: no such model directory: {self.model}")
        if self.kind == "vllm":
            self.check_engine_keys(f"aux.{self.name}", self.num_gpus, "num_gpus")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError(f"aux.{self.name}: an openai source needs base_url and model")

    def sampling(self) -> dict:
        return {
            "k": self.k,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }


class Source:
    """The interface: a name, a config, and ``generate(samples) -> [[text, ...] per sample]``."""

    cacheable = True

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.name = cfg.name

    @property
    def model_id(self) -> str:
        return f"{self.cfg.kind}:{self.cfg.model}"

    def prompt_text(self, sample: Sample) -> str:
        """What identifies the request in the cache (the task prompt, not a chat rendering)."""
        return repr(build_messages(sample, self.cfg.system_prompt))

    def generate(self, samples: list[Sample]) -> list[list[str]]:
        raise NotImplementedError

    def restart(self, error: BaseException | None = None) -> None:
        """Ask for a fresh backend after ``error`` (vllm: a hung actor is killed and restarted)."""

    def shutdown(self) -> None:
        pass


class DatasetSource(Source):
    """Replays the sample's recorded ``cot`` as an action (no model, no cost)."""

    cacheable = False

    def generate(self, samples):
        return [[s.cot] if s.cot else [] for s in samples]


class VllmSource(Source):
    def __init__(
        self,
        cfg: SourceConfig,
        seed: int = 0,
        engine_share: int = 1,
        files: str | None = None,
        cache_dir: str | None = None,
        placement=None,
    ):
        """``cfg.model`` goes to the engines as it is (a HF id is resolved on their nodes, in
        ``cache_dir`` or their HF cache); ``files``: the model's directory on this node, for its
        processor (default: ``cfg.model``). ``placement``: the run's placement groups."""
        from ekipl.engines.policy import start_engine_actor
        from ekipl.models import hf

        super().__init__(cfg)
        self.processor = hf.load_processor(files or cfg.model, cfg.min_pixels, cfg.max_pixels)
        spec = vb.engine_spec(cfg, cfg.model, seed, dtype="auto", cache_dir=cache_dir)
        self.actors = [
            start_engine_actor(
                spec,
                f"aux/{cfg.name}/{r}",
                cfg.num_cpus,
                cfg.num_gpus,
                cfg.resources,
                engine_share,
                placement,
                max_restarts=-1,
                max_task_retries=0,
            )
            for r in range(cfg.replicas)
        ]
        self._seed = seed
        self.calls = 0  # generate() calls that reached the engines (the cache spares the rest)

    def ready(self, timeout: float = 600.0):
        """Wait until every replica is up, including one that Ray is restarting."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(
                    [a.ready.remote() for a in self.actors], timeout=max(1.0, deadline - time.monotonic())
                )
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def generate(self, samples):
        import ray

        from ekipl.engines import vllm_backend as vb

        reqs = []
        for s in samples:
            prompt = render_prompt(self.processor, s, self.cfg.system_prompt)
            reqs.append(vb.Request(prompt=prompt, images=s.load_images()))
        # The seed follows the batch's content, not a call counter, so a resumed run samples the
        # same actions for the same batch as an uninterrupted one.
        self.calls += 1
        seed = self._seed + zlib.crc32("\x1f".join(s.id for s in samples).encode())
        shards = [list(range(i, len(reqs), len(self.actors))) for i in range(len(self.actors))]
        refs = [
            actor.generate.remote(
                [reqs[i] for i in idx],
                n=self.cfg.k,
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
                seed=seed,
                top_p=self.cfg.top_p,
            )
            for actor, idx in zip(self.actors, shards, strict=True)
            if idx
        ]
        outs = ray.get(refs, timeout=self.cfg.call_timeout_s)
        result: list[list[str]] = [[] for _ in samples]
        for idx, out in zip([s for s in shards if s], outs, strict=True):
            for i, group in zip(idx, out, strict=True):
                result[i] = [c.text for c in group]
        return result

    def restart(self, error: BaseException | None = None):
        import ray

        if isinstance(error, ray.exceptions.GetTimeoutError):
            for a in self.actors:  # a hung actor is killed; max_restarts=-1 brings it back
                ray.kill(a, no_restart=False)
        # a dead actor (RayActorError, ActorUnavailableError) is already being restarted by Ray

    def shutdown(self):
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)


class HFSource(Source):
    """transformers ``generate`` in this process: slow, but needs no vLLM."""

    def __init__(self, cfg: SourceConfig, seed: int = 0):
        from ekipl.models import hf

        super().__init__(cfg)
        self.processor = hf.load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
        self.model = hf.load_model(cfg.model).eval()
        self.seed = seed

    def generate(self, samples):
        import torch

        out = []
        for s in samples:
            text = render_prompt(self.processor, s, self.cfg.system_prompt)
            images = s.load_images()
            enc = self.processor(text=[text], images=images or None, return_tensors="pt")
            torch.manual_seed(self.seed)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    max_new_tokens=self.cfg.max_tokens,
                    num_return_sequences=self.cfg.k,
                )
            tok = getattr(self.processor, "tokenizer", self.processor)
            out.append(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        return out


class SourceError(RuntimeError):
    pass


class OpenAISource(Source):
    """An OpenAI-compatible ``/chat/completions`` endpoint. The API key never leaves the header."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, cfg: SourceConfig, seed: int = 0):
        import httpx

        super().__init__(cfg)
        self._key = os.environ.get(cfg.api_key_env, "")
        if not self._key:
            log.warning(
                "aux.%s: environment variable %s is not set; calling without a key", cfg.name, cfg.api_key_env
            )
        self._client = httpx.Client(timeout=cfg.timeout_s)
        self._sem = threading.Semaphore(cfg.max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency)
        self._rng = random.Random(seed)
        self.retries = 0

    def __repr__(self):  # never show the key
        return f"OpenAISource(name={self.name!r}, model={self.cfg.model!r}, base_url={self.cfg.base_url!r})"

    @staticmethod
    def _image_part(img) -> dict:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    def _messages(self, s: Sample) -> list[dict]:
        msgs = []
        for m in build_messages(s, self.cfg.system_prompt):
            if isinstance(m["content"], str):
                msgs.append(m)
                continue
            images = iter(s.load_images())
            parts = [self._image_part(next(images)) if p["type"] == "image" else p for p in m["content"]]
            msgs.append({"role": m["role"], "content": parts})
        return msgs

    def _one(self, messages: list[dict]) -> str | None:
        import httpx

        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "max_tokens": self.cfg.max_tokens,
        }
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        for attempt in range(self.cfg.max_retries + 1):
            wait = self.cfg.backoff_s * (2**attempt) * (0.5 + self._rng.random())
            try:
                with self._sem:
                    r = self._client.post(url, json=body, headers=headers)
                if r.status_code == 200:
                    try:
                        return r.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        problem = "a malformed response body"
                elif r.status_code in self.RETRY_STATUS:
                    problem = f"HTTP {r.status_code}"
                    ra = r.headers.get("retry-after")
                    if ra and ra.replace(".", "", 1).isdigit():
                        wait = max(wait, min(float(ra), 60.0))
                else:
                    log.error("aux.%s: %s answered HTTP %d; not retrying", self.name, url, r.status_code)
                    return None
            except httpx.TimeoutException:
                problem = f"a timeout after {self.cfg.timeout_s}s"
            except httpx.TransportError as e:
                problem = f"a connection error ({type(e).__name__})"
            if attempt < self.cfg.max_retries:
                self.retries += 1
                log.warning(
                    "aux.%s: %s from %s; retry %d/%d in %.2fs",
                    self.name,
                    problem,
                    url,
                    attempt + 1,
                    self.cfg.max_retries,
                    wait,
                )
                time.sleep(wait)
        log.error(
            "aux.%s: giving up on a request to %s after %d retries", self.name, url, self.cfg.max_retries
        )
        return None

    def generate(self, samples):
        jobs = [[self._pool.submit(self._one, self._messages(s)) for _ in range(self.cfg.k)] for s in samples]
        return [[t for t in (f.result() for f in fs) if t is not None] for fs in jobs]

    def shutdown(self):
        self._pool.shutdown(wait=False)
        self._client.close()


def make_source(cfg: SourceConfig, seed: int = 0, engine_share: int = 1, **engine) -> Source:
    """The source for ``cfg``. ``engine_share``: how many engines of the run generate at the same time
    on one CPU machine (vllm sources split its cores with them; ignored on GPU). ``engine``: a vllm
    source's ``files``, ``cache_dir`` and ``placement`` (:class:`VllmSource`)."""
    if cfg.kind == "vllm":
        return VllmSource(cfg, seed, engine_share=engine_share, **engine)
    return {"dataset": DatasetSource, "openai": OpenAISource, "hf": HFSource}[cfg.kind](
        *((cfg,) if cfg.kind == "dataset" else (cfg, seed))
    )
