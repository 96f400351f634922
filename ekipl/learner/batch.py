"""Multimodal batching for the learner: groups of actions -> padded Qwen2-VL tensors.

Each sequence is ``prompt + completion``; the prompt (text and images) is run through the processor
once per group, and the G actions of the group share its processed image. Padding is on the right
and masked; M-RoPE positions are left to the model (it derives them from ``image_grid_thw``,
``mm_token_type_ids`` and ``attention_mask``).

A batch may mix rows with and without images (text-only problems beside visual ones). A VLM's batch
also carries one dummy image (``dummy_pixel_values``): a micro-batch with no image at all runs it
through the vision tower with zero weight (:mod:`ekipl.learner.logprobs`), so that every rank runs
the tower in every forward and backward. Under ZeRO-3 a rank that skipped it would leave the other
ranks waiting in the tower's parameter gathers (the hang EasyR1 and LLaMA-Factory fixed the same way).

Log-probs are aligned with ``input_ids[:, 1:]``: ``completion_mask[:, t]`` is 1 where
``input_ids[:, t + 1]`` is a completion token (:mod:`ekipl.learner.logprobs` computes them).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from ekipl.types import Group


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L - 1], aligned with log-probs of input_ids[:, 1:]
    advantages: torch.Tensor  # [B]
    is_aux: torch.Tensor  # [B] bool
    source_ids: torch.Tensor  # [B] index into ``sources``
    sources: list[str]
    pixel_values: torch.Tensor | None = None  # [sum of patches, D]
    image_grid_thw: torch.Tensor | None = None  # [num images, 3]
    patches: list[int] = dataclasses.field(default_factory=list)  # pixel rows per sequence
    images: list[int] = dataclasses.field(default_factory=list)  # images per sequence
    mm_token_type_ids: torch.Tensor | None = None  # [B, L]
    old_logp: torch.Tensor | None = None  # [B, L - 1]
    ref_logp: torch.Tensor | None = None  # [B, L - 1]
    # The engine's log-probs of the policy's sampled tokens, where it reported them (0 elsewhere),
    # aligned like completion_mask; sampled_mask marks them. The learner compares its own π_old with
    # them (actor/rollout_logprob_diff): weights, tokens and masks must agree between the two.
    sampled_logp: torch.Tensor | None = None  # [B, L - 1]
    sampled_mask: torch.Tensor | None = None  # [B, L - 1]
    # A VLM's one-image input for micro-batches without images (see the module docstring).
    dummy_pixel_values: torch.Tensor | None = None
    dummy_grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def totals(self) -> dict:
        """The whole batch's normalisers, passed to every rank's update so that the ranks' shard
        losses add up to the whole batch's: completion tokens, sequences, longest completion."""
        return dict(
            global_tokens=float(self.completion_mask.sum()),
            global_seqs=float(len(self)),
            max_len=int(self.completion_mask.sum(-1).max()),
        )

    def padding(self) -> tuple[int, int]:
        """(padded positions, real tokens) of this batch as it is laid out: rows x longest row."""
        real = int(self.attention_mask.sum())
        return int(self.attention_mask.numel()) - real, real

    def model_inputs(self) -> dict:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            out.update(
                pixel_values=self.pixel_values,
                image_grid_thw=self.image_grid_thw,
                mm_token_type_ids=self.mm_token_type_ids,
            )
        return out

    def select(self, rows: list[int]) -> Batch:
        """The sub-batch of ``rows`` (with their own pixel rows and grids), trimmed of shared padding."""
        idx = torch.tensor(rows, dtype=torch.long)
        pv = thw = None
        with_images = self.pixel_values is not None and any(self.images[r] for r in rows)
        if with_images:
            p_start = [0]
            i_start = [0]
            for n_p, n_i in zip(self.patches, self.images, strict=True):
                p_start.append(p_start[-1] + n_p)
                i_start.append(i_start[-1] + n_i)
            pv = torch.cat([self.pixel_values[p_start[r] : p_start[r + 1]] for r in rows])
            thw = torch.cat([self.image_grid_thw[i_start[r] : i_start[r + 1]] for r in rows])
        length = int(self.attention_mask[idx].sum(-1).max()) if rows else 1

        def cut(t, n=length):
            return None if t is None else t[idx][:, :n]

        return Batch(
            input_ids=cut(self.input_ids),
            attention_mask=cut(self.attention_mask),
            completion_mask=cut(self.completion_mask, length - 1),
            advantages=self.advantages[idx],
            is_aux=self.is_aux[idx],
            source_ids=self.source_ids[idx],
            sources=self.sources,
            pixel_values=pv,
            image_grid_thw=thw,
            patches=[self.patches[r] for r in rows] if self.patches else [],
            images=[self.images[r] for r in rows] if self.images else [],
            mm_token_type_ids=cut(self.mm_token_type_ids) if with_images else None,
            old_logp=cut(self.old_logp, length - 1),
            ref_logp=cut(self.ref_logp, length - 1),
            sampled_logp=cut(self.sampled_logp, length - 1),
            sampled_mask=cut(self.sampled_mask, length - 1),
            dummy_pixel_values=self.dummy_pixel_values,
            dummy_grid_thw=self.dummy_grid_thw,
        )


def dummy_image_inputs(processor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pixel_values, image_grid_thw) of the smallest image the processor makes (a black square,
    resized up to its minimum), or None for a text-only model's tokenizer."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    from PIL import Image

    enc = image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    return enc["pixel_values"], enc["image_grid_thw"]


def collate(groups: list[Group], processor, advantages: torch.Tensor, pad_id: int | None = None) -> Batch:
    """Build a :class:`Batch` from groups; ``advantages`` is flat over all actions in order."""
    from ekipl.models.hf import mm_token_type_ids

    tok = getattr(processor, "tokenizer", processor)
    pad_id = tok.pad_token_id if pad_id is None else pad_id
    placeholders = {
        t
        for t in (getattr(processor, "image_token_id", None), getattr(processor, "video_token_id", None))
        if isinstance(t, int)
    }
    seqs, prompt_lens, pvs, thws, patches, images, sources, src_ids, is_aux, sampled = ([] for _ in range(10))
    for g in groups:
        imgs = g.sample.load_images()
        if imgs:
            enc = processor(text=[g.prompt], images=imgs, return_tensors="pt")  # once per group
        else:
            enc = {"input_ids": tok([g.prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]}
        prompt_ids = enc["input_ids"][0].tolist()
        for a in g.actions:
            if not a.token_ids:
                raise ValueError(f"sample {g.sample.id!r}: action from {a.source!r} has no tokens")
            if placeholders & set(a.token_ids):
                raise ValueError(
                    f"sample {g.sample.id!r}: an action from {a.source!r} contains image/video placeholder "
                    f"tokens {sorted(placeholders & set(a.token_ids))}, which no image features can fill"
                )
            seqs.append(prompt_ids + list(a.token_ids))
            prompt_lens.append(len(prompt_ids))
            if imgs:
                pvs.append(enc["pixel_values"])
                thws.append(enc["image_grid_thw"])
            patches.append(int(enc["pixel_values"].shape[0]) if imgs else 0)
            images.append(int(enc["image_grid_thw"].shape[0]) if imgs else 0)
            if a.source not in sources:
                sources.append(a.source)
            src_ids.append(sources.index(a.source))
            is_aux.append(not a.is_policy)
            lps = a.sampling_logprobs
            sampled.append(lps if lps is not None and len(lps) == len(a.token_ids) else None)
    if len(advantages) != len(seqs):
        raise ValueError(f"{len(advantages)} advantages for {len(seqs)} actions")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    cmask = torch.zeros((len(seqs), length - 1), dtype=torch.float32)
    slogp, smask = torch.zeros_like(cmask), torch.zeros_like(cmask)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        cmask[i, p - 1 : len(s) - 1] = 1.0
        where = cmask[i].nonzero().squeeze(-1)  # placed by the mask: a mask off by one shows there
        if sampled[i] is not None and len(where) == len(sampled[i]):
            slogp[i, where] = torch.tensor(sampled[i])
            smask[i, where] = 1.0
    batch = Batch(
        input_ids=ids,
        attention_mask=attn,
        completion_mask=cmask,
        advantages=advantages.float(),
        is_aux=torch.tensor(is_aux, dtype=torch.bool),
        source_ids=torch.tensor(src_ids),
        sources=sources,
        sampled_logp=slogp if smask.any() else None,
        sampled_mask=smask if smask.any() else None,
    )
    dummy = dummy_image_inputs(processor)
    if dummy is not None:
        batch.dummy_pixel_values, batch.dummy_grid_thw = dummy
    if pvs:
        batch.pixel_values = torch.cat(pvs)
        batch.image_grid_thw = torch.cat(thws)
        batch.patches, batch.images = patches, images
        token_ids = SimpleNamespace(
            image_token_id=processor.image_token_id, video_token_id=getattr(processor, "video_token_id", -1)
        )
        batch.mm_token_type_ids = mm_token_type_ids(token_ids, ids)
    return batch
