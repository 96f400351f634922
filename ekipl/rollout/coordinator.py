"""``RolloutCoordinator``: fan each prompt out to the policy and every auxiliary source, then merge,
re-tokenize, score and select the EKIPL group.

Auxiliary actions do not depend on the policy's weights, so :meth:`prefetch` starts them for the
next batch in the background (while the policy generates and the learner updates); their results
land in the content-addressed cache, which :meth:`rollout` reads. A failed or hung auxiliary source
is logged and restarted, and groups are built from the remaining sources; a failed policy engine
raises :class:`~ekipl.engines.policy.PolicyEngineError`.

With ``rollout.one_step_off``, :meth:`start_early` also starts the *policy's* generation for the
next batch before the learner updates (one-step-off-policy rollout, as verl's): the engines generate
it with the weights that produced the current batch while the learner computes the next ones, and
the next :meth:`rollout` uses it. Those actions are one update stale; π_old is still the learner's
own forward pass, so the objective treats them as on-policy. :meth:`early_state` /
:meth:`restore_early` carry a finished early rollout through a checkpoint, so a resumed run samples
what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ekipl.engines import vllm_backend as vb
from ekipl.rollout import selection
from ekipl.rollout.cache import ActionCache, cache_key
from ekipl.rollout.config import RolloutConfig
from ekipl.rollout.sources import Source
from ekipl.tasks.prompts import render_prompt
from ekipl.tasks.sample import Sample
from ekipl.tasks.scorer import Scorer
from ekipl.types import POLICY, Action, Group

log = logging.getLogger(__name__)


def text_token_ids(tokenizer, text: str, eos_id: int, max_tokens: int) -> tuple[list[int], str]:
    """External text (an aux model's answer, a recorded trace) in the policy's tokens, ending with the
    end-of-turn token, or cut at ``max_tokens`` (then without it; the text is cut to match).

    External text is data, never control: an ``<|image_pad|>`` in it stays plain text."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) >= max_tokens:
        ids = ids[:max_tokens]
        return ids, tokenizer.decode(ids)
    return ids + [eos_id], text


class RolloutCoordinator:
    def __init__(
        self,
        cfg: RolloutConfig,
        policy,
        sources: list[Source],
        processor,
        scorer: Scorer | None = None,
        cache: ActionCache | None = None,
    ):
        """``scorer`` scores every candidate (default: the built-in task rewards, default weights)."""
        self.cfg, self.policy, self.sources, self.processor = cfg, policy, sources, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.scorer, self.cache = scorer or Scorer(), cache
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * len(sources) + 1))
        self._pending: dict[tuple[str, tuple[str, ...]], Future] = {}
        self.failures: dict[str, int] = {s.name: 0 for s in sources}
        self.costs: dict[str, dict[str, int]] = {s.name: {"requests": 0, "tokens": 0} for s in sources}
        self._cost_lock = threading.Lock()
        self._step = 0
        self._early: EarlyRollout | None = None
        self._last_pass: dict[str, float] = {}  # sample id -> its policy pass rate at the last visit
        self._started: dict[tuple[str, str], tuple[Future, int]] = {}  # gate_prefetch: (source, id)
        self.gate_counts = {"prefetched": 0, "on_demand": 0, "unused": 0}
        self.last_candidates: list[tuple[Sample, list[Action]]] = []  # the last rollout's, scored

    # ------------------------------------------------------------------------------------------
    # Auxiliary sources

    def _aux(self, source: Source, samples: list[Sample]) -> list[list[str]]:
        """Texts per sample from one source, through the cache. Never raises: a failure is logged,
        the source is restarted, and the samples get no actions from it this time."""
        keys: list[str | None] = [None] * len(samples)
        out: list[list[str] | None] = [None] * len(samples)
        if self.cache is not None and source.cacheable:
            for i, s in enumerate(samples):
                keys[i] = cache_key(
                    source.model_id, source.prompt_text(s), list(s.image_paths), source.cfg.sampling()
                )
                out[i] = self.cache.get(keys[i])
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            try:
                texts = source.generate([samples[i] for i in todo])
            except Exception as e:  # a dead or hung actor, an unreachable endpoint
                self.failures[source.name] += 1
                log.warning(
                    "aux source %r failed (%s: %s); building groups from the remaining sources and "
                    "restarting it",
                    source.name,
                    type(e).__name__,
                    (str(e).splitlines() or [""])[0][:200],
                )
                try:
                    source.restart(e)
                except Exception as e2:
                    log.warning("aux source %r: restart failed: %s", source.name, e2)
                texts = [[] for _ in todo]
            else:
                self._count(source, len(todo), texts)
                if self.cache is not None and source.cacheable:
                    for i, t in zip(todo, texts, strict=True):
                        if t:
                            self.cache.put(keys[i], t, {"source": source.name, "sample": samples[i].id})
            for i, t in zip(todo, texts, strict=True):
                out[i] = t
        return [o or [] for o in out]

    def _count(self, source: Source, prompts: int, texts: list[list[str]]) -> None:
        """What guidance cost: completions asked of ``source`` (prompts x k; cache hits cost nothing)
        and the tokens it returned, in the policy's tokens (an API bills in its own: an estimate)."""
        tokens = sum(
            len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for ts in texts for t in ts
        )
        with self._cost_lock:
            c = self.costs[source.name]
            c["requests"] += prompts * source.cfg.k
            c["tokens"] += tokens

    def cost_metrics(self) -> dict[str, float]:
        """Cumulative ``aux/requests|tokens|cost_usd/<source>`` and their totals (``aux/*_total``);
        the cost is ``aux.NAME.price_per_1k_tokens`` x tokens / 1000."""
        m: dict[str, float] = {}
        with self._cost_lock:
            for s in self.sources:
                c = self.costs[s.name]
                m[f"aux/requests/{s.name}"] = float(c["requests"])
                m[f"aux/tokens/{s.name}"] = float(c["tokens"])
                m[f"aux/cost_usd/{s.name}"] = c["tokens"] / 1000.0 * s.cfg.price_per_1k_tokens
        for key in ("requests", "tokens", "cost_usd"):
            m[f"aux/{key}_total"] = sum(v for k, v in m.items() if k.startswith(f"aux/{key}/"))
        return m

    def prefetch(self, samples: list[Sample]) -> None:
        """Start auxiliary generation for an upcoming batch in the background (on demand, with
        ``rollout.gate_prefetch``: for the prompts that needed guidance at their last visit)."""
        if not self.cfg.prefetch:
            return
        if self.cfg.on_demand:
            if self.cfg.gate_prefetch:
                self._start_likely(samples)
            return
        ids = tuple(s.id for s in samples)
        for src in self.sources:
            key = (src.name, ids)
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._aux, src, samples)

    def _start_likely(self, samples: list[Sample]) -> None:
        likely = [
            s
            for s in samples
            if s.id in self._last_pass
            and self.cfg.needs_guidance(self._last_pass[s.id])
            and not any((src.name, s.id) in self._started for src in self.sources)
        ]
        if likely:
            for src in self.sources:
                fut = self._pool.submit(self._aux, src, likely)
                for j, s in enumerate(likely):
                    self._started[(src.name, s.id)] = (fut, j)

    def _guidance(self, samples: list[Sample], need: list[int]) -> list[tuple[str, list[int], list]]:
        """On-demand auxiliary texts for ``samples[i]``, ``i`` in ``need``: those started at the
        prefetch (``gate_prefetch``) are taken, the rest are asked now, every source at once. Started
        answers of the other samples are let go (counted ``unused``)."""
        wanted = {samples[i].id for i in need}
        plans = []
        for src in self.sources:
            held = {
                s.id: self._started.pop((src.name, s.id))
                for s in samples
                if (src.name, s.id) in self._started
            }
            self.gate_counts["unused"] += sum(sid not in wanted for sid in held)
            rest = [samples[i] for i in need if samples[i].id not in held]
            plans.append((src, held, rest, self._pool.submit(self._aux, src, rest) if rest else None))
        out = []
        for src, held, rest, fut in plans:
            fresh = iter(fut.result() if fut is not None else [])
            texts = []
            for i in need:
                sid = samples[i].id
                texts.append(held[sid][0].result()[held[sid][1]] if sid in held else next(fresh))
            self.gate_counts["prefetched"] += len(need) - len(rest)
            self.gate_counts["on_demand"] += len(rest)
            out.append((src.name, need, texts))
        return out

    def gate_state(self) -> dict[str, float]:
        """The policy pass rate per prompt at its last visit (``gate_prefetch``'s memory), for a
        checkpoint: a resumed run starts the same requests early. Empty without gate_prefetch."""
        return dict(self._last_pass)

    def restore_gate(self, state: dict[str, float] | None) -> None:
        self._last_pass = dict(state or {})

    def _aux_future(self, src: Source, samples: list[Sample]) -> Future:
        return self._pending.pop((src.name, tuple(s.id for s in samples)), None) or self._pool.submit(
            self._aux, src, samples
        )

    # ------------------------------------------------------------------------------------------

    def prompt(self, sample: Sample) -> str:
        return render_prompt(self.processor, sample, self.cfg.system_prompt)

    def _aux_action(self, source: str, text: str, sample: Sample) -> Action:
        """An external action in the policy's tokens, not yet scored (:meth:`_score`)."""
        ids, text = text_token_ids(self.tokenizer, text, self.eos_id, self.cfg.aux_max_tokens)
        return Action(
            source=source,
            token_ids=ids,
            text=text,
            truncated=ids[-1:] != [self.eos_id],  # cut at rollout.aux_max_tokens
        )

    def _score(self, pairs: list[tuple[Action, Sample]]) -> None:
        """Score actions in one batch (a user's reward function gets it whole) and fill in their
        reward, accuracy and format."""
        rewards = self.scorer.score_batch(
            [a.text for a, _ in pairs], [s for _, s in pairs], lengths=[len(a.token_ids) for a, _ in pairs]
        )
        for (a, _), r in zip(pairs, rewards, strict=True):
            a.reward, a.accuracy, a.format = r.total, r.accuracy, r.format

    @staticmethod
    def _requests(prompts: list[str], samples: list[Sample]) -> list[vb.Request]:
        return [vb.Request(prompt=p, images=s.load_images()) for p, s in zip(prompts, samples, strict=True)]

    def _submit(self, requests: list[vb.Request], step: int, rnd: int = 0):
        """Policy sampling seeded by the step (and the dynamic-sampling round after the first)."""
        return self.policy.submit(
            requests,
            n=self.cfg.n,
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
            seed=self.cfg.seed * 100003 + step + rnd * 1_000_003,
            ignore_eos=self.cfg.ignore_eos,
        )

    def start_early(self, samples: list[Sample], step: int) -> None:
        """Start the policy's generation for step ``step``'s batch now, with the engines' current
        weights (one-step-off-policy rollout); :meth:`rollout` for the same step and samples uses it."""
        requests = self._requests([self.prompt(s) for s in samples], samples)
        self._early = EarlyRollout(step, tuple(s.id for s in samples), self._submit(requests, step))

    def _take_early(self, samples: list[Sample], step: int) -> list[list[vb.Completion]] | None:
        early, self._early = self._early, None
        if early is None:
            return None
        out = early.completions()  # also when unused: a failed engine is reported, never skipped
        if (early.step, early.sample_ids) != (step, tuple(s.id for s in samples)):
            log.warning(
                "the early rollout (step %d, samples %s) is not step %d's batch: generating again",
                early.step,
                list(early.sample_ids),
                step,
            )
            return None
        return out

    def early_state(self) -> dict | None:
        """The early rollout for the next step, finished, as JSON-able data (for a checkpoint)."""
        if self._early is None:
            return None
        return {
            "step": self._early.step,
            "sample_ids": list(self._early.sample_ids),
            "completions": [[dataclasses.asdict(c) for c in comps] for comps in self._early.completions()],
        }

    def restore_early(self, state: dict | None) -> None:
        """Undo :meth:`early_state` (a resumed run continues with the early rollout it had saved)."""
        if state:
            done = [[vb.Completion(**c) for c in comps] for comps in state["completions"]]
            self._early = EarlyRollout(state["step"], tuple(state["sample_ids"]), done=done)

    def rollout(self, samples: list[Sample], step: int | None = None, more=None) -> tuple[list[Group], dict]:
        """Groups for ``samples``. ``step`` (default: the previous call's + 1) seeds policy sampling,
        so a resumed run samples what an uninterrupted one would have. The policy's actions come
        from :meth:`start_early` when it was called for this step and these samples.

        ``more`` (dynamic sampling, ``rollout.dynamic_sampling``): a function returning the next
        batch of samples; while fewer than ``len(samples)`` groups have signal (tied groups are
        dropped), another batch is rolled out, up to ``rollout.max_sample_rounds`` batches, and the
        first ``len(samples)`` groups with signal are returned."""
        t0 = time.perf_counter()
        self._step = self._step + 1 if step is None else step
        timing = {"rollout": 0.0, "aux_wait": 0.0, "reward": 0.0}
        rounds = [self._round(samples, 0, timing)]
        kept = list(rounds[0].groups)
        while more is not None and len(kept) < len(samples) and len(rounds) < self.cfg.max_sample_rounds:
            batch = more()
            if not batch:
                break
            rounds.append(self._round(batch, len(rounds), timing))
            kept += rounds[-1].groups
        groups = kept[: len(samples)]
        candidates = [c for r in rounds for c in r.candidates]
        self.last_candidates = [pair for r in rounds for pair in zip(r.samples, r.candidates, strict=True)]
        metrics = self._metrics(
            candidates,
            groups,
            sum(r.dropped for r in rounds),
            sum(r.aux_wins for r in rounds),
            [p for r in rounds for p in r.pass_rates],
        )
        metrics.update(self.cost_metrics())
        if self.cfg.gate_prefetch:  # cumulative: guided prompts served early / asked late, answers let go
            metrics.update({f"aux/gate_{k}": float(v) for k, v in self.gate_counts.items()})
        metrics.update(
            {
                "rollout/one_step_off": float(rounds[0].early),  # 1: generated before the previous update
                "rollout/sample_rounds": float(len(rounds)),
                "rollout/prompts_drawn": float(sum(len(r.samples) for r in rounds)),
                "rollout/groups_kept": float(len(groups)),
                "rollout/groups_with_signal": float(len(kept)),
                "timing/rollout": timing["rollout"],  # with an early rollout: only the wait for its end
                "timing/aux_wait": timing["aux_wait"],  # on demand: the whole aux request
                "timing/reward": timing["reward"],  # scoring every candidate, re-tokenizing aux text
                "timing/rollout_total": time.perf_counter() - t0,
            }
        )
        return groups, metrics

    def _round(self, samples: list[Sample], rnd: int, timing: dict) -> _Round:
        """One batch of prompts: policy samples (round 0 may take the early rollout), auxiliary
        actions (prefetched, or on demand where the policy's pass rate calls for them), scores and
        the selected groups (tied ones dropped)."""
        t0 = time.perf_counter()
        prompts = [self.prompt(s) for s in samples]
        aux_futs = (
            {} if self.cfg.on_demand else {src.name: self._aux_future(src, samples) for src in self.sources}
        )
        completions = self._take_early(samples, self._step) if rnd == 0 else None
        early = completions is not None
        if not early:
            completions = self._submit(self._requests(prompts, samples), self._step, rnd).result()
        t1 = time.perf_counter()
        candidates = [
            [self._policy_action(c, s) for c in comps] for s, comps in zip(samples, completions, strict=True)
        ]
        self._score([(a, s) for s, acts in zip(samples, candidates, strict=True) for a in acts])
        t2 = time.perf_counter()
        if self.cfg.on_demand:
            need = [
                i for i, acts in enumerate(candidates) if self.cfg.needs_guidance(selection.pass_rate(acts))
            ]
            aux_texts = self._guidance(samples, need) if need or self._started else []
            aux_texts = [t for t in aux_texts if t[1]]
        else:
            everyone = list(range(len(samples)))
            aux_texts = [(name, everyone, f.result()) for name, f in aux_futs.items()]
        t3 = time.perf_counter()
        aux_pairs = []
        for name, idx, texts_per_sample in aux_texts:
            for i, texts in zip(idx, texts_per_sample, strict=True):
                actions = [self._aux_action(name, t, samples[i]) for t in texts]
                aux_pairs += [(a, samples[i]) for a in actions]
                candidates[i] += actions
        self._score(aux_pairs)
        out = _Round(samples=samples, candidates=candidates, early=early)
        if self.cfg.gate_prefetch:  # its memory of the visits: the policy's own pass rate
            self._last_pass.update(
                (s.id, selection.pass_rate(c)) for s, c in zip(samples, candidates, strict=True)
            )
        for s, p, acts in zip(samples, prompts, candidates, strict=True):
            out.pass_rates.append(selection.pass_rate(acts))
            best = selection.best(acts)
            out.aux_wins += int(best is not None and not best.is_policy and not selection.all_tied(acts))
            chosen = selection.select(acts, self.cfg.selection, self.cfg.group_size, self.cfg.num_replace)
            if self.cfg.drop_tied and selection.all_tied(chosen):
                out.dropped += 1
                continue
            out.groups.append(Group(sample=s, prompt=p, actions=chosen))
        timing["rollout"] += t1 - t0
        timing["aux_wait"] += t3 - t2
        timing["reward"] += (t2 - t1) + (time.perf_counter() - t3)
        return out

    def _policy_action(self, c: vb.Completion, s: Sample) -> Action:
        """A policy sample as an action, not yet scored (:meth:`_score`)."""
        return Action(
            source=POLICY,
            token_ids=list(c.token_ids),
            text=c.text,
            sampling_logprobs=list(c.logprobs),
            truncated=c.finish_reason == "length",  # hit rollout.max_tokens, no end token
        )

    def _metrics(self, candidates, groups, dropped, aux_wins, pass_rates) -> dict:
        m: dict[str, float] = {}
        by_source: dict[str, list[Action]] = {}
        for acts in candidates:
            for a in acts:
                by_source.setdefault(a.source, []).append(a)
        for name, acts in by_source.items():
            m[f"reward/{name}/mean"] = sum(a.reward for a in acts) / len(acts)
            m[f"reward/{name}/accuracy"] = sum(a.accuracy for a in acts) / len(acts)
            m[f"reward/{name}/format"] = sum(a.format for a in acts) / len(acts)
            lengths = [len(a.token_ids) for a in acts]  # in the policy's tokens, end token included
            m[f"length/{name}/mean"] = sum(lengths) / len(lengths)
            m[f"length/{name}/max"] = float(max(lengths))
            m[f"length/{name}/min"] = float(min(lengths))
            m[f"length/{name}/truncated_frac"] = sum(a.truncated for a in acts) / len(acts)
        selected = [a for g in groups for a in g.actions]
        for name in [POLICY] + [s.name for s in self.sources]:
            m[f"select/ratio/{name}"] = sum(a.source == name for a in selected) / max(1, len(selected))
        m["select/aux_win_rate"] = aux_wins / max(1, len(candidates))
        m["rollout/policy_pass_rate"] = sum(pass_rates) / max(1, len(pass_rates))
        m["rollout/dropped_groups"] = float(dropped)
        m["rollout/policy_tokens"] = float(
            sum(len(a.token_ids) for acts in candidates for a in acts if a.is_policy)
        )
        for name, n in self.failures.items():
            m[f"aux/failures/{name}"] = float(n)
        return m

    def drain(self) -> None:
        """Wait for prefetched auxiliary work to land in the cache (before a checkpoint)."""
        for f in list(self._pending.values()):
            f.result()

    def shutdown(self):
        self._early = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        for s in self.sources:
            s.shutdown()


@dataclasses.dataclass
class _Round:
    """One batch of prompts rolled out (dynamic sampling may run several per step)."""

    samples: list[Sample]
    candidates: list[list[Action]]
    early: bool = False
    groups: list[Group] = dataclasses.field(default_factory=list)
    dropped: int = 0
    aux_wins: int = 0
    pass_rates: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EarlyRollout:
    """The policy's generation for a coming step: in flight (``pending``) or finished (``done``)."""

    step: int
    sample_ids: tuple[str, ...]
    pending: object = None  # a PolicyRouter.submit handle
    done: list[list[vb.Completion]] | None = None

    def completions(self) -> list[list[vb.Completion]]:
        return self.pending.result() if self.done is None else self.done  # result() keeps its answer
