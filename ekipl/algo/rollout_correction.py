"""Rollout correction: the update weighs what the engine actually sampled (pure torch, no I/O).

The policy's actions are sampled by the inference engine from a behaviour policy μ: its weights may be
stale (one step off, or N versions behind under bounded staleness), and a bf16 engine on a GPU
computes other probabilities than the learner even with the same weights. π_old is the learner's own
log-prob of each sampled token before the update; the engine reports log μ of the tokens it sampled
(``Action.sampling_logprobs``). Per sampled token t of policy action i:

    ρ_t = π_old(y_t) / μ(y_t) = exp(log π_old − log μ)

``ROLLOUT_CORRECTIONS`` (``algorithm.rollout_correction``, threshold C = ``algorithm.rollout_correction_c``):

* ``none``:   w_t = 1
* ``tis``:    w_t = min(ρ_t, C)                      token-level truncated importance sampling
* ``mis``:    w_t = 1[1/C ≤ ρ̄_i ≤ C] for every t of action i, with the geometric mean
              ρ̄_i = exp( Σ_t m_it (log π_old − log μ) / Σ_t m_it )  (a sequence far off is masked)
* ``icepop``: w_t = 1[1/C ≤ ρ_t ≤ C]                 token-level masking (IcePop)

The weights are constants (no gradient flows through them) and multiply the per-token policy-gradient
loss: ℓ'_t = w_t ℓ_t (the KL term is not weighted). Tokens without μ, the external actions' (their
probabilities under the auxiliary model are unknown), keep w_t = 1: they follow their own rule
(``algorithm.offpolicy``).

The mismatch, over the sampled tokens (n of them, with μ), logged every step whatever the mode:

* ``kl``:  KL(μ ‖ π_old) ≈ mean_t (ρ_t − 1 − log ρ_t)   (the k3 estimator under samples from μ; ≥ 0)
* ``chi2``: χ²(π_old ‖ μ) ≈ mean_t ρ_t² − 1            (the variance the importance weights add)
* ``ess``: (Σ_t ρ_t)² / (n Σ_t ρ_t²) ∈ (0, 1]           the effective sample size per token
* ``clipped_frac`` (tis): the share of tokens with ρ_t > C; ``masked_frac`` (mis, icepop): with w_t = 0
"""

from __future__ import annotations

import torch

ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "icepop")


def _log_ratio(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """log π_old − log μ where μ is known (0 elsewhere, so exp gives ρ = 1 there)."""
    return torch.where(known, old_logp.detach() - behaviour_logp, torch.zeros_like(old_logp))


def correction_weights(
    mode: str, old_logp: torch.Tensor, behaviour_logp: torch.Tensor, known: torch.Tensor, c: float
) -> torch.Tensor:
    """Per-token weights w [B, T] (see the module docstring); 1 where ``known`` (bool [B, T]: the
    token has an engine log-prob) is false."""
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"algorithm.rollout_correction: unknown {mode!r}; known: {ROLLOUT_CORRECTIONS}")
    ones = torch.ones_like(old_logp)
    if mode == "none":
        return ones
    log_rho = _log_ratio(old_logp, behaviour_logp, known)
    rho = log_rho.exp()
    lo, hi = 1.0 / c, c
    if mode == "tis":
        w = rho.clamp(max=c)
    elif mode == "icepop":
        w = ((rho >= lo) & (rho <= hi)).to(old_logp.dtype)
    else:  # mis: the sequence's geometric-mean ratio decides for all its tokens
        k = known.to(old_logp.dtype)
        mean_log = (log_rho * k).sum(-1) / k.sum(-1).clamp(min=1.0)
        rbar = mean_log.exp()
        keep = ((rbar >= lo) & (rbar <= hi)).to(old_logp.dtype)
        w = keep[:, None].expand_as(old_logp)
    return torch.where(known, w, ones).detach()


def mismatch_metrics(
    mode: str,
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    known: torch.Tensor,
    weights: torch.Tensor,
    c: float,
) -> dict[str, torch.Tensor]:
    """The module docstring's mismatch metrics over the known tokens ({} when there are none)."""
    n = known.sum()
    if float(n) == 0:
        return {}
    with torch.no_grad():
        log_rho = _log_ratio(old_logp, behaviour_logp, known)
        rho = log_rho.exp()
        k = known.to(rho.dtype)
        s1, s2 = (rho * k).sum(), (rho * rho * k).sum()
        out = {
            "kl": ((rho - 1.0 - log_rho) * k).sum() / n,
            "chi2": s2 / n - 1.0,
            "ess": s1 * s1 / (n * s2),
            "masked_frac": ((weights == 0).to(rho.dtype) * k).sum() / n,
            "clipped_frac": ((rho > c).to(rho.dtype) * k).sum() / n if mode == "tis" else torch.zeros(()),
        }
    return out
