"""Log-probs and entropy of completion tokens, with logits only where they are used.

A VLM's LM head over the whole sequence is [B, L, V] fp32 (V = 151,936 rows for Qwen2-VL), most
of it at prompt and image positions that the loss never reads, and log-softmax and its gradient
double or triple it. :func:`sequence_logprobs` runs the model's body once, gathers the hidden states
at completion positions (``completion_mask``), and runs the LM head, log-softmax and entropy over
them in chunks of ``chunk_tokens`` rows. Under autograd each chunk is checkpointed (its logits are
recomputed in the backward pass), so at most one chunk of logits is alive at a time in the forward
and in the backward. The values equal the full computation (:func:`full_logprobs`, kept as the
reference) to float rounding.

Log-probs are aligned with ``input_ids[:, 1:]`` as ``completion_mask`` is; positions outside the
mask are 0.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _last_hidden(out) -> torch.Tensor:
    """The body's output: a ModelOutput, or (as ZeRO-3's hooks hand it on) a tuple or the tensor."""
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, tuple | list) else out


def _hidden_states(model, batch) -> torch.Tensor:
    """The body's last hidden states [B, L, H], through the model's own forward (so a DeepSpeed
    engine's hooks, ZeRO-3's parameter gathering among them, run as for any forward) with the LM
    head on no position at all (``logits_to_keep``: an empty index)."""
    module = getattr(model, "module", model)
    seen = {}

    def keep_hidden(mod, args, out):  # returns None: the body's output goes on unchanged
        seen["h"] = _last_hidden(out)

    handle = module.model.register_forward_hook(keep_hidden)
    try:
        keep = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
        model(**batch.model_inputs(), use_cache=False, logits_to_keep=keep)
    finally:
        handle.remove()
    return seen["h"]


def _chunk(head, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    logits = head(hidden).float()
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        ent = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, ent


def chunked_logprobs(
    head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, with_entropy=False
):
    """log p(targets[n] | hidden[n]) for N rows of hidden states [N, H], ``chunk_tokens`` rows at a
    time (0: all at once); returns (logp [N], entropy [N] or None)."""
    n = hidden.shape[0]
    step = chunk_tokens if chunk_tokens > 0 else max(n, 1)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    logps, ents = [], []
    for i in range(0, n, step):
        h, t = hidden[i : i + step], targets[i : i + step]
        if grad:
            lp, ent = checkpoint(_chunk, head, h, t, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk(head, h, t, with_entropy)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def sequence_logprobs(model, batch, with_entropy: bool = False, chunk_tokens: int = 1024):
    """log π(input_ids[:, t+1] | ...) at completion positions, shape [B, L-1] (0 elsewhere);
    optionally the policy's entropy there too. The LM head runs on completion positions only."""
    head = getattr(model, "module", model).lm_head
    hidden = _hidden_states(model, batch)[:, :-1]
    mask = batch.completion_mask.to(hidden.device).bool()
    targets = batch.input_ids[:, 1:][mask]
    lp, ent = chunked_logprobs(head, hidden[mask], targets, chunk_tokens, with_entropy)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    logp[mask] = lp
    if not with_entropy:
        return logp, None
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    entropy[mask] = ent
    return logp, entropy


def full_logprobs(model, batch, with_entropy: bool = False):
    """The same values from the LM head and an fp32 log-softmax at every position (ekipl's learner
    before chunking; the reference in tests and bench/learner.py)."""
    logits = model(**batch.model_inputs(), use_cache=False).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
