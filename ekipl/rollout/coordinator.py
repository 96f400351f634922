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
import time

from ekipl.engines import vllm_backend as vb
from ekipl.rollout import selection
from ekipl.rollout.auxiliary import AuxFetcher
from ekipl.rollout.cache import ActionCache
from ekipl.rollout.config import RolloutConfig
from ekipl.rollout.early import EarlyRollouts
from ekipl.rollout.gate import Gate
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
        """``scorer`` scores every candidate (default: the built-in task rewards, default weights).
        The concerns around the policy's own samples each have a class of their own: the auxiliary
        sources (:class:`~ekipl.rollout.auxiliary.AuxFetcher`: cache, prefetch, failures, costs), the gate
        (:class:`~ekipl.rollout.gate.Gate`) and the early rollout
        (:class:`~ekipl.rollout.early.EarlyRollouts`)."""
        self.cfg, self.policy, self.sources, self.processor = cfg, policy, sources, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.scorer = scorer or Scorer()
        self.aux = AuxFetcher(sources, self.tokenizer, cache)
        self.gate = Gate(cfg, self.aux)
        self.early = EarlyRollouts(max(1, cfg.ahead))
        self._step = 0
        self.last_candidates: list[tuple[Sample, list[Action]]] = []  # the last rollout's, scored

    @property
    def failures(self) -> dict[str, int]:
        return self.aux.failures

    @property
    def cache(self) -> ActionCache | None:
        return self.aux.cache

    @property
    def _pool(self):
        return self.aux.pool

    def cost_metrics(self) -> dict[str, float]:
        return self.aux.cost_metrics()

    def prefetch(self, samples: list[Sample]) -> None:
        """Start auxiliary generation for an upcoming batch in the background (on demand, with
        ``rollout.gate_prefetch``: for the prompts that needed guidance at their last visit)."""
        if not self.cfg.prefetch:
            return
        if not self.cfg.on_demand:
            self.aux.prefetch(samples)
        elif self.cfg.gate_prefetch:
            self.gate.prefetch(samples)

    def gate_state(self) -> dict[str, float]:
        return self.gate.state()

    def restore_gate(self, state: dict[str, float] | None) -> None:
        self.gate.restore(state)

    def start_early(self, samples: list[Sample], step: int) -> None:
        """Start the policy's generation for step ``step``'s batch now, with the engines' current
        weights (one-step-off-policy rollout); :meth:`rollout` for the same step and samples uses it."""
        requests = self._requests([self.prompt(s) for s in samples], samples)
        # started now: with the weights after the last update, which is this step's (or, before the
        # first rollout, the base weights)
        self.early.start(step, samples, self._submit(requests, step), started=self._step)

    def early_state(self) -> list[dict]:
        return self.early.state()

    def restore_early(self, state: dict | None) -> None:
        self.early.restore(state)

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
        # updates between the weights that sampled each policy action and the learner's, over the step
        ages = [a.staleness for acts in candidates for a in acts if a.is_policy]
        if ages:
            metrics["rollout/staleness_mean"] = sum(ages) / len(ages)
            metrics["rollout/staleness_max"] = float(max(ages))
        metrics.update(self.aux.cost_metrics())
        metrics.update(self.gate.metrics())
        metrics.update(
            {
                "rollout/one_step_off": float(rounds[0].early),  # 1: generated before the previous update
                "rollout/stale_dropped": float(self.early.stale_dropped),  # cumulative
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
            {} if self.cfg.on_demand else {src.name: self.aux.future(src, samples) for src in self.sources}
        )
        taken = self.early.take(samples, self._step) if rnd == 0 else None
        early = taken is not None
        completions, staleness = taken if early else (None, 0)
        if not early:
            completions = self._submit(self._requests(prompts, samples), self._step, rnd).result()
        t1 = time.perf_counter()
        candidates = [
            [self._policy_action(c, s, staleness) for c in comps]
            for s, comps in zip(samples, completions, strict=True)
        ]
        self._score([(a, s) for s, acts in zip(samples, candidates, strict=True) for a in acts])
        t2 = time.perf_counter()
        if self.cfg.on_demand:
            need = [
                i for i, acts in enumerate(candidates) if self.cfg.needs_guidance(selection.pass_rate(acts))
            ]
            aux_texts = self.gate.guidance(samples, need) if need or self.gate.pending() else []
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
        out = _Round(samples=samples, candidates=candidates, early=early, staleness=staleness)
        self.gate.remember({s.id: selection.pass_rate(c) for s, c in zip(samples, candidates, strict=True)})
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

    def _policy_action(self, c: vb.Completion, s: Sample, staleness: int = 0) -> Action:
        """A policy sample as an action, not yet scored (:meth:`_score`)."""
        return Action(
            source=POLICY,
            staleness=staleness,
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
        self.aux.drain()

    def shutdown(self):
        self.early.clear()
        self.aux.shutdown()


@dataclasses.dataclass
class _Round:
    """One batch of prompts rolled out (dynamic sampling may run several per step)."""

    samples: list[Sample]
    candidates: list[list[Action]]
    early: bool = False
    staleness: int = 0  # how many updates old the policy's weights were when it sampled
    groups: list[Group] = dataclasses.field(default_factory=list)
    dropped: int = 0
    aux_wins: int = 0
    pass_rates: list[float] = dataclasses.field(default_factory=list)
