"""Log-probs and entropy of completion tokens, with logits only where they are used.

A VLM's LM head over the whole sequence is [B, L, V] fp32 (V = 151,936 rows for Qwen2-VL), most
of it at prompt and image positions that the loss never reads, and log-softmax and its gradient
double or triple it. :func:`sequence_logprobs` runs the model's body once, gathers the hidden states
at completion positions (``completion_mask``), and runs the LM head, log-softmax and entropy over
them in chunks of ``chunk_tokens`` rows. Under autograd each chunk is checkpointed (its logits are
recomputed in the backward pass), so at most one chunk of logits is alive at a time in the forward
and in the backward, and the log-softmax's backward builds the logits' gradient in place
(:class:`_TargetLogProb`). The values equal the full computation (:func:`full_logprobs`, kept as
the reference) to float rounding.

With ``pack`` the body runs on the micro-batch's rows packed into one row without padding
(:func:`packed_inputs`); the hidden states are then read back at each row's completion positions.

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


def require_packable(model) -> None:
    """``learner.pack_sequences`` on a model not known to keep attention within packed sequences
    would let sequences attend to each other silently: refuse it at start-up instead."""
    from ekipl.models.families import FAMILIES, UnsupportedModelError, family_of_model

    try:
        packable = family_of_model(model).packable
    except UnsupportedModelError:
        packable = False
    if not packable:
        supported = ", ".join(k for k, f in FAMILIES.items() if f.packable)
        raise ValueError(
            f"learner.pack_sequences: {model.config.model_type!r} models are not known to keep attention "
            f"within packed sequences (supported: {supported}); set learner.pack_sequences=false"
        )


def packed_inputs(module, batch) -> dict:
    """The rows' real tokens as one row [1, S] with no padding: position ids restart at each row and
    there is no attention mask, from which transformers builds a mask that keeps each row to itself.
    M-RoPE models (Qwen2-VL) take their 3-D positions from the padded rows, with the text positions
    prepended (transformers finds the rows from those); images stay in row order."""
    keep = batch.attention_mask.bool()
    text = (batch.attention_mask.long().cumsum(-1) - 1)[keep][None]  # [1, S]
    out = {"input_ids": batch.input_ids[keep][None], "attention_mask": None, "position_ids": text}
    body = module.model
    if hasattr(body, "get_rope_index"):
        if batch.pixel_values is not None:
            rope, _ = body.get_rope_index(
                batch.input_ids,
                mm_token_type_ids=batch.mm_token_type_ids,
                image_grid_thw=batch.image_grid_thw,
                attention_mask=batch.attention_mask,
            )
            rope = rope[:, keep][:, None]  # [3, 1, S]
        else:
            rope = text[None].expand(3, 1, -1)
        out["position_ids"] = torch.cat([text[None], rope.to(text)], 0)  # [4, 1, S]
    if batch.pixel_values is not None:
        out.update(
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=batch.mm_token_type_ids[keep][None],
        )
    return out


def _hidden_states(model, batch, pack: bool = False) -> torch.Tensor:
    """The body's last hidden states [B, L, H] (packed: [1, S, H]), through the model's own forward
    (so a DeepSpeed engine's hooks, ZeRO-3's parameter gathering among them, run as for any forward)
    with the LM head on no position at all (``logits_to_keep``: an empty index)."""
    module = _transformers_model(model)
    seen = {}

    def keep_hidden(mod, args, out):  # returns None: the body's output goes on unchanged
        seen["h"] = _last_hidden(out)

    inputs = packed_inputs(module, batch) if pack else batch.model_inputs()
    handles = [module.model.register_forward_hook(keep_hidden)]
    for target, hook in _dummy_image_hooks(module, batch):
        handles.append(target.register_forward_hook(hook))
    try:
        keep = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
        model(**inputs, use_cache=False, logits_to_keep=keep)
    finally:
        for h in handles:
            h.remove()
    return seen["h"]


def _dummy_image_hooks(module, batch) -> list:
    """For a VLM's micro-batch without images: hooks that run the vision tower on the batch's dummy
    image with weight 0 where the family's image features enter (:meth:`Family.dummy_image_hooks`).
    Every rank then runs the tower in every forward and backward, and no value or gradient changes:
    a rank that skipped it would leave the others waiting in (ZeRO-3) or mismatching (ZeRO-2) the
    tower's collectives."""
    from ekipl.models.families import family_of_model

    if batch.pixel_values is not None or batch.dummy_pixel_values is None:
        return []
    family = family_of_model(module)
    if not family.vision:  # a text-only model fed a VLM's batch (tests): nothing to run
        return []
    return family.dummy_image_hooks(module, batch.dummy_pixel_values, batch.dummy_grid_thw)


def _transformers_model(model):
    """The transformers model under a DeepSpeed engine and a peft wrapper (LoRA), either or both:
    the body and the head are its own (the forward goes through the wrappers, so their hooks and
    the adapters run)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _completion_hidden(model, batch, mask: torch.Tensor, pack: bool) -> torch.Tensor:
    """Hidden states at the ``mask`` (completion) positions, [N, H] in its row-major order."""
    if not pack:
        return _hidden_states(model, batch)[:, :-1][mask]
    hidden = _hidden_states(model, batch, pack=True)[0]
    at = batch.attention_mask.flatten().cumsum(0).view(batch.attention_mask.shape) - 1  # packed index
    return hidden[at[:, :-1].to(mask.device)[mask]]


class _TargetLogProb(torch.autograd.Function):
    """(log softmax(z)[target], entropy) for logits z [n, V] in few passes over z: e = exp(z - max z)
    is computed once and gives log Z, the entropy (log Z - sum_v e_v z_v / sum_v e_v; empty unless
    asked for) and the backward, which turns e in place into the logits' gradient
    g * (onehot(target) - e / sum e): no [n, V] buffer beyond z and e (so it runs backward once;
    the checkpoint around it recomputes e for each backward)."""

    @staticmethod
    def forward(ctx, logits, targets, with_entropy: bool):
        top = logits.amax(-1, keepdim=True)
        e = (logits - top).exp_()
        total = e.sum(-1)
        logz = top.squeeze(-1) + total.log()
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
        ent = logz - torch.linalg.vecdot(e, logits) / total if with_entropy else logz[:0]
        ctx.save_for_backward(e, targets, total)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad, _grad_ent):
        e, targets, total = ctx.saved_tensors
        out = e.mul_((-grad / total)[:, None])
        return out.scatter_add_(-1, targets[:, None], grad[:, None]), None, None


def _chunk(head, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool, calls: list[int]):
    calls[0] += 1  # a second call is the checkpoint's recompute: the entropy (no gradient) is known
    logp, ent = _TargetLogProb.apply(head(hidden).float(), targets, with_entropy and calls[0] == 1)
    return logp, (ent if with_entropy else None)


def n_chunks(n_tokens: int, chunk_tokens: int) -> int:
    """How many LM-head chunks :func:`chunked_logprobs` makes of ``n_tokens`` rows."""
    return -(-n_tokens // chunk_tokens) if chunk_tokens > 0 else int(n_tokens > 0)


def chunked_logprobs(
    head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, with_entropy=False, min_chunks=0
):
    """log p(targets[n] | hidden[n]) for N rows of hidden states [N, H], ``chunk_tokens`` rows at a
    time (0: all at once); returns (logp [N], entropy [N] or None).

    ``min_chunks``: run the head at least this many times (the extra calls on no rows). Under ZeRO-3
    every call of the head gathers its weight, a collective, so every rank must call it as often as
    the others: the learner passes the most chunks any rank has in this micro-batch."""
    n = hidden.shape[0]
    step = chunk_tokens if chunk_tokens > 0 else max(n, 1)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    # A trained head (full fine-tuning) needs the non-reentrant checkpoint: the reentrant one runs a
    # backward per chunk, and ZeRO-2 then reduces the head's gradient once per chunk ("gradient
    # computed twice"). A frozen head (LoRA) partitioned by ZeRO-3 needs the reentrant one: the
    # non-reentrant recompute reads the head's weight after ZeRO-3 released it (an empty tensor),
    # while the reentrant one re-runs the head's forward, whose hooks gather it again. Elsewhere the
    # non-reentrant one: the reentrant one made a LoRA step 3.4x slower on CPU (bench/perf/learner.py).
    params = list(head.parameters())
    frozen = not any(p.requires_grad for p in params) and any(hasattr(p, "ds_id") for p in params)
    logps, ents = [], []
    starts = list(range(0, n, step))
    starts += [n] * max(0, min_chunks - len(starts))  # empty chunks: the head runs on no rows
    for i in starts:
        h, t = hidden[i : i + step], targets[i : i + step]
        if grad:
            lp, ent = checkpoint(_chunk, head, h, t, with_entropy, [0], use_reentrant=frozen)
        else:
            lp, ent = _chunk(head, h, t, with_entropy, [0])
        logps.append(lp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def sequence_logprobs(
    model, batch, with_entropy: bool = False, chunk_tokens: int = 256, pack: bool = False, min_chunks: int = 0
):
    """log π(input_ids[:, t+1] | ...) at completion positions, shape [B, L-1] (0 elsewhere);
    optionally the policy's entropy there too. The LM head runs on completion positions only.
    ``pack``: the body runs on the rows packed into one, padding-free (:func:`packed_inputs`).
    ``min_chunks``: see :func:`chunked_logprobs`."""
    head = _transformers_model(model).lm_head
    mask = batch.completion_mask.bool()  # on the model's device, as the batch is
    hidden = _completion_hidden(model, batch, mask, pack)
    targets = batch.input_ids[:, 1:][mask]
    lp, ent = chunked_logprobs(head, hidden, targets, chunk_tokens, with_entropy, min_chunks)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    logp[mask] = lp
    if not with_entropy:
        return logp, None
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    entropy[mask] = ent
    return logp, entropy


def full_logprobs(model, batch, with_entropy: bool = False):
    """The same values from the LM head and an fp32 log-softmax at every position (ekipl's learner
    before chunking; the reference in tests and bench/perf/learner.py)."""
    logits = model(**batch.model_inputs(), use_cache=False).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
