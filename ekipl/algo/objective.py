"""The EKIPL / GRPO objective: pure tensor math (torch only; no Ray, no DeepSpeed, no I/O).

Notation, per token t of action i in a group of G selected actions for one prompt:

* r_i      -- the action's scalar reward (accuracy + format, already weighted);
* π_θ      -- the current policy's token probability (``logp`` = log π_θ);
* π_old    -- the learner's own log-prob of the token before this update's first inner epoch
  (recomputed by the learner, so μ > 1 inner epochs are possible and the first epoch has ratio 1);
* π_ref    -- the frozen reference policy's log-prob (only when β > 0);
* ρ_t      -- π_θ / π_old, the importance ratio.

**Advantages** (one value per action, broadcast over its tokens; ``ADVANTAGES`` registry):

* ``grpo``:      A_i = (r_i − mean(r)) / (std(r) + eps)
* ``mean_only``: A_i =  r_i − mean(r)                           (Dr.GRPO: no std normalisation)
* ``split``:     A_i = (r_i − mean(r_pol)) / (std(r_pol) + eps) (statistics from policy actions only,
  as LUFFY's grpo_split; falls back to all actions when fewer than two are from the policy)
* ``gated``:     A_i = grpo(r)_i, unless the group holds a correct policy action j (c_j = 1: full
  accuracy) with grpo(r)_j < 0 (external actions outrank it); then the group's A_i = split(r)_i.
  Whole-group statistics never push a correct answer of the policy's own down:

      A_i = (r_i − mean(r)) / (std(r) + eps)              if  min_{j: pol, c_j} grpo(r)_j ≥ 0
      A_i = (r_i − mean(r_pol)) / (std(r_pol) + eps)      otherwise

std is the population standard deviation (``std=population``, the default) or the sample one
(``std=sample``, ``torch.std``'s unbiased estimate, as TRL 0.15, which Reason-RFT trained with, and
verl use); a one-action group has std 0. With Adam the two differ by a constant factor per group size
(√(G/(G−1))), which the optimizer's normalisation mostly absorbs; they differ where eps or β matters.

**Per-token loss** (``OFFPOLICY`` registry for auxiliary actions):

* on-policy tokens, PPO-clip:  ℓ = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A)
* auxiliary tokens:
    - ``plain``:  the same PPO-clip, with π_old recomputed by the learner (the paper's rule);
    - ``shaped``: ℓ = −A · f(π_θ), f(p) = p / (p + γ), unclipped (LUFFY's policy shaping; its gradient
      A·γ/(p+γ)²·p·∇log p stays bounded and vanishes as p → 0);
    - ``mis``:    ℓ = −A · π_θ / ((π_old + 1) / 2), unclipped (RL-PLUS's multiple importance weight,
      with the unknown external policy's probability taken as 1).

**Rollout correction** (``algorithm.rollout_correction``, :mod:`ekipl.algo.rollout_correction`): the
policy tokens' PPO-clip loss is multiplied by constant weights w_t from π_old and the engine's
behaviour log-probs μ (truncated importance weights, or masks of tokens or sequences too far off),
ℓ'_t = w_t ℓ_t; external actions' tokens keep w_t = 1.

**KL** to the reference, the k3 estimator, added per token with coefficient β:

    k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1  ≥ 0

**Aggregation** of per-token values ℓ_it under mask m_it (``AGGREGATIONS`` registry):

* ``token_mean``:              Σ_it m ℓ / Σ_it m
* ``seq_mean_token_mean``:     mean_i ( Σ_t m ℓ / Σ_t m )
* ``seq_mean_token_sum_norm``: mean_i ( Σ_t m ℓ ) / L, with L a constant (the max completion length)

For data parallelism the denominators can be given globally (``global_tokens`` /
``global_seqs``), so the sum over ranks and micro-batches of each shard's loss equals the loss of the
whole batch in one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ekipl.algo.rollout_correction import ROLLOUT_CORRECTIONS, correction_weights, mismatch_metrics

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}
OFFPOLICY: dict[str, Callable] = {}
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
STDS = ("population", "sample")


def _register(table: dict, name: str):
    def deco(fn):
        table[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# Advantages


def _std(x: torch.Tensor, unbiased: bool) -> torch.Tensor:
    return x.std(unbiased=unbiased) if len(x) > 1 else torch.zeros((), dtype=x.dtype)


@_register(ADVANTAGES, "grpo")
def grpo_advantages(rewards, is_policy, eps: float = 1e-6, unbiased: bool = False) -> torch.Tensor:
    """A = (r − mean) / (std + eps) over one group's selected actions."""
    return (rewards - rewards.mean()) / (_std(rewards, unbiased) + eps)


@_register(ADVANTAGES, "mean_only")
def mean_only_advantages(rewards, is_policy, eps: float = 1e-6, unbiased: bool = False) -> torch.Tensor:
    """A = r − mean (Dr.GRPO)."""
    return rewards - rewards.mean()


@_register(ADVANTAGES, "split")
def split_advantages(rewards, is_policy, eps: float = 1e-6, unbiased: bool = False) -> torch.Tensor:
    """A = (r − mean(r_policy)) / (std(r_policy) + eps); all actions if < 2 are from the policy."""
    ref = rewards[is_policy] if int(is_policy.sum()) >= 2 else rewards
    return (rewards - ref.mean()) / (_std(ref, unbiased) + eps)


@_register(ADVANTAGES, "gated")
def gated_advantages(rewards, is_policy, eps=1e-6, unbiased=False, correct=None) -> torch.Tensor:
    """grpo, or split where grpo would give a correct policy action (``correct``) a negative A."""
    whole = grpo_advantages(rewards, is_policy, eps, unbiased)
    if correct is not None and bool((whole[is_policy & correct] < 0).any()):
        return split_advantages(rewards, is_policy, eps, unbiased)
    return whole


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    is_policy: torch.Tensor,
    mode: str = "grpo",
    eps: float = 1e-6,
    std: str = "population",
    correct: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages for a flat batch of actions; ``group_index[i]`` names action i's group.
    ``correct`` (bool, per action: full accuracy) is read by the ``gated`` estimator."""
    if mode not in ADVANTAGES:
        raise ValueError(f"unknown advantage mode {mode!r}; known: {sorted(ADVANTAGES)}")
    if std not in STDS:
        raise ValueError(f"unknown std {std!r}; known: {STDS}")
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(group_index):
        sel = group_index == g
        extra = {"correct": correct[sel]} if mode == "gated" and correct is not None else {}
        out[sel] = ADVANTAGES[mode](rewards[sel].float(), is_policy[sel], eps, std == "sample", **extra)
    return out


# --------------------------------------------------------------------------------------------------
# Per-token losses


def ppo_clip(logp, old_logp, adv, eps_low: float, eps_high: float):
    """−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) and a mask of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float(), ratio


@_register(OFFPOLICY, "plain")
def offpolicy_plain(logp, old_logp, adv, cfg: ObjectiveConfig):
    """The paper's rule: auxiliary tokens get the on-policy PPO-clip with the learner's π_old."""
    return ppo_clip(logp, old_logp, adv, cfg.clip_low, cfg.clip_high)


@_register(OFFPOLICY, "shaped")
def offpolicy_shaped(logp, old_logp, adv, cfg: ObjectiveConfig):
    """LUFFY: −A·f(π_θ), f(p) = p/(p+γ), unclipped."""
    p = torch.exp(logp)
    ratio = p / (p + cfg.shaping_gamma)
    return -adv * ratio, torch.zeros_like(logp), ratio


@_register(OFFPOLICY, "mis")
def offpolicy_mis(logp, old_logp, adv, cfg: ObjectiveConfig):
    """RL-PLUS: −A·π_θ / ((π_old + 1)/2), unclipped."""
    ratio = torch.exp(logp) / ((torch.exp(old_logp) + 1.0) / 2.0)
    return -adv * ratio, torch.zeros_like(logp), ratio


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref − logp) − (ref − logp) − 1 (non-negative, unbiased for KL(π_θ‖π_ref))."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` [B, T] under ``mask`` to a scalar (see the module docstring)."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        denom = global_tokens if global_tokens is not None else mask.sum().clamp(min=1.0)
        return (values * mask).sum() / denom
    seqs = global_seqs if global_seqs is not None else values.shape[0]
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / seqs
    if mode == "seq_mean_token_sum_norm":
        length = max_len if max_len is not None else values.shape[-1]
        return (values * mask).sum() / (seqs * length)
    raise ValueError(f"unknown aggregation {mode!r}; known: {AGGREGATIONS}")


# --------------------------------------------------------------------------------------------------
# The whole objective


@dataclasses.dataclass
class ObjectiveConfig:
    advantage: str = "grpo"
    offpolicy: str = "plain"
    clip_low: float = 0.2
    clip_high: float = 0.2
    shaping_gamma: float = 0.1
    kl_coef: float = 0.0
    aggregation: str = "token_mean"
    eps: float = 1e-6
    std: str = "population"  # the group std: population, or sample (TRL 0.15 / Reason-RFT, with eps 1e-4)
    # The engine/learner mismatch of the policy's own tokens (ekipl.algo.rollout_correction): none,
    # tis (weights min(π_old/μ, C)), mis (a sequence whose geometric-mean ratio leaves [1/C, C] is
    # masked) or icepop (tokens whose ratio leaves [1/C, C] are masked); C = rollout_correction_c.
    rollout_correction: str = "none"
    rollout_correction_c: float = 2.0

    def __post_init__(self):
        if self.std not in STDS:
            raise ValueError(f"algorithm.std: unknown {self.std!r}; known: {STDS}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"algorithm.advantage: unknown {self.advantage!r}; known: {sorted(ADVANTAGES)}")
        if self.offpolicy not in OFFPOLICY:
            raise ValueError(f"algorithm.offpolicy: unknown {self.offpolicy!r}; known: {sorted(OFFPOLICY)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"algorithm.aggregation: unknown {self.aggregation!r}; known: {AGGREGATIONS}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("algorithm.clip_low must be in [0, 1) and algorithm.clip_high >= 0")
        if self.kl_coef < 0 or self.shaping_gamma <= 0:
            raise ValueError("algorithm.kl_coef must be >= 0 and algorithm.shaping_gamma > 0")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            known = ROLLOUT_CORRECTIONS
            raise ValueError(
                f"algorithm.rollout_correction: unknown {self.rollout_correction!r}; known: {known}"
            )
        if self.rollout_correction_c <= 1.0:
            raise ValueError(f"algorithm.rollout_correction_c must be > 1, got {self.rollout_correction_c}")


def policy_loss(
    cfg: ObjectiveConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_aux: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    max_len: int | None = None,
    behaviour_logp: torch.Tensor | None = None,
    behaviour_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise for a batch of actions, and detached metrics.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` are [B, T]; ``advantages`` and ``is_aux``
    (bool) are [B]. ``behaviour_logp`` / ``behaviour_mask`` [B, T]: the engine's log-probs of the
    tokens it sampled and where they exist (rollout correction and the mismatch metrics; None: no
    policy tokens with engine log-probs). Returns ``(loss, metrics)``.
    """
    adv = advantages[:, None].to(logp.dtype).expand_as(logp)
    on_loss, on_clip, on_ratio = ppo_clip(logp, old_logp, adv, cfg.clip_low, cfg.clip_high)
    aux = is_aux[:, None].expand_as(logp)
    if bool(is_aux.any()):
        off_loss, off_clip, off_ratio = OFFPOLICY[cfg.offpolicy](logp, old_logp, adv, cfg)
        per_token = torch.where(aux, off_loss, on_loss)
        clipped = torch.where(aux, off_clip, on_clip)
        ratio = torch.where(aux, off_ratio, on_ratio)
    else:
        per_token, clipped, ratio = on_loss, on_clip, on_ratio
    corr: dict[str, torch.Tensor] = {}
    if behaviour_logp is not None and behaviour_mask is not None:
        known = behaviour_mask.bool() & ~aux
        c = cfg.rollout_correction_c
        w = correction_weights(cfg.rollout_correction, old_logp, behaviour_logp, known, c)
        per_token = per_token * w
        corr = mismatch_metrics(cfg.rollout_correction, old_logp, behaviour_logp, known, w, c)
    agg = dict(global_tokens=global_tokens, global_seqs=global_seqs, max_len=max_len)
    kl = torch.zeros_like(logp)
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + cfg.kl_coef * kl
    loss = aggregate(per_token, mask, cfg.aggregation, **agg)

    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp(min=1.0)
        metrics = {
            "kl": (kl * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "pg_loss": aggregate(per_token - cfg.kl_coef * kl, mask, "token_mean"),
        }
        # Per source kind, only where this batch has such tokens (a mean over none is no zero):
        # clip_frac / policy_ratio_mean on policy tokens, aux_* on auxiliary ones. The importance
        # ratio here is always π_θ/π_old (1 in the first inner epoch), whatever the off-policy mode.
        rho = torch.exp(logp.detach() - old_logp)
        for prefix, kind in (("", ~aux), ("aux_", aux)):
            km = m * kind.float()
            if float(km.sum()) > 0:
                metrics[f"{prefix}clip_frac"] = (clipped * km).sum() / km.sum()
                metrics[f"{prefix or 'policy_'}ratio_mean"] = (rho * km).sum() / km.sum()
        metrics.update({f"rollout_corr/{k}": v for k, v in corr.items()})
    return loss, metrics


def metric_tokens(mask: torch.Tensor, is_aux: torch.Tensor) -> dict[str, float]:
    """How many tokens each metric of :func:`policy_loss` and :func:`sft_loss` is a mean over: the
    weights that combine micro-batches' (and ranks') metrics into the whole batch's exactly."""
    m = mask.float()
    n, aux = float(m.sum()), float(m[is_aux.bool()].sum())
    return {
        **dict.fromkeys(("kl", "ratio_mean", "pg_loss", "nll"), n),
        **dict.fromkeys(("clip_frac", "policy_ratio_mean"), n - aux),
        **dict.fromkeys(("aux_clip_frac", "aux_ratio_mean"), aux),
    }


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, *, global_tokens: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 CoT-SFT (Reason-RFT's warm-up): the token-mean negative log-likelihood of the recorded
    trace, ``L = −Σ_{b,t} m_{b,t} log π_θ(y_{b,t}) / Σ_{b,t} m_{b,t}`` (the denominator is the whole
    batch's token count when ``global_tokens`` is given, as for the RL loss)."""
    loss = aggregate(-logp, mask, "token_mean", global_tokens=global_tokens)
    with torch.no_grad():
        m = mask.to(logp.dtype)
        nll = (-logp * m).sum() / m.sum().clamp(min=1.0)
    return loss, {"nll": nll}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy H = −Σ_v p_v log p_v, shape logits.shape[:-1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def per_source_means(values: torch.Tensor, source_ids: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Mean of per-action ``values`` [B] for each source id in ``source_ids`` [B]."""
    out = {}
    for i, name in enumerate(names):
        sel = source_ids == i
        if bool(sel.any()):
            out[name] = float(values[sel].float().mean())
    return out
