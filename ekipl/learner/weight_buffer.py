"""A safetensors file in shared memory that weight sync rewrites in place.

Weight sync used to build a fresh dict of cloned tensors, check it with ``isfinite`` (a bool copy
of every weight) and serialise it into a new file for every sync: three passes over the weights,
each into freshly faulted memory, about 45x the cost of copying them once (bench/perf/weight_sync.py).

Here the file's layout (header, then each tensor's bytes) is fixed at the first sync, and later
syncs copy each parameter straight into its slot of the mapped file: one warm copy. Engines read it
with plain ``safetensors.torch.load_file``, which maps it without copying. Readers must be done
before the next :meth:`WeightBuffer.write` (``LearnerGroup.sync_weights`` waits for every engine).

Layout (the safetensors format): an 8-byte little-endian header length N, N bytes of JSON header,
padded with spaces so the data starts 8-byte aligned, then the tensors back to back, widest element
size first so every tensor stays aligned for its dtype, with no holes.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


class WeightBuffer:
    """One safetensors file at ``path`` with one slot per (name, dtype, shape) of ``layout``."""

    def __init__(self, path: str, layout: Layout):
        unknown = sorted({str(d) for _, d, _ in layout if d not in _DTYPES})
        if unknown:
            raise TypeError(f"weight sync cannot carry tensors of dtype {', '.join(unknown)}")
        self.path, self.layout = path, layout
        order = sorted(layout, key=lambda t: -t[1].itemsize)  # stable: keeps the model's order within a size
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        spans = {}
        for name, dtype, shape in order:
            n = dtype.itemsize * math.prod(shape)
            header[name] = dict(dtype=_DTYPES[dtype], shape=list(shape), data_offsets=[offset, offset + n])
            spans[name] = (offset, n)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        start = 8 + len(raw)
        self.nbytes = offset
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + offset)
        os.replace(tmp, path)
        # MAP_SHARED: writes land in the file itself, which engines map in turn.
        mem = torch.from_file(path, shared=True, size=start + offset, dtype=torch.uint8)
        self.views = {
            name: mem[start + spans[name][0] : start + sum(spans[name])].view(dtype).view(shape)
            for name, dtype, shape in layout
        }

    def write(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy ``tensor`` into its slot; returns whether the written values are all finite.

        The check is one reduction over the slot (NaN and ±inf survive a sum; a false alarm would
        need weights near the dtype's maximum, which are broken anyway), not an ``isfinite`` copy.
        """
        view = self.views[name]
        view.copy_(tensor.detach())
        return not view.is_floating_point() or bool(torch.isfinite(view.sum()))


def layout_of(named: list[tuple[str, torch.Tensor]]) -> Layout:
    """The layout of full (gathered) parameters; ZeRO-3 shards report their full shape in ``ds_shape``."""
    return tuple((n, p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named)
