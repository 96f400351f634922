"""The shared-memory weight buffer that weight sync rewrites in place (no Ray, no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ekipl.learner.weight_buffer import WeightBuffer, layout_of


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Mixed dtypes with odd sizes: a naive back-to-back layout would misalign the fp32 tensors.
    return {
        "embed.weight": torch.randn(7, 5, generator=g),
        "norm.weight": torch.randn(3, generator=g).to(torch.bfloat16),
        "proj.weight": torch.randn(3, 3, generator=g).to(torch.float16),
        "head.bias": torch.randn(11, generator=g, dtype=torch.float64),
        "steps": torch.arange(5, dtype=torch.int64) + seed,
        "mask": torch.tensor([True, False, True]),
    }


def _fill(buf: WeightBuffer, tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in tensors.items() if not buf.write(n, t)]


def test_buffer_is_a_safetensors_file_that_later_writes_rewrite_in_place(tmp_path):
    first, second = _tensors(0), _tensors(1)
    buf = WeightBuffer(str(tmp_path / "w.safetensors"), layout_of(list(first.items())))
    assert _fill(buf, first) == []
    loaded = load_file(buf.path)
    assert loaded.keys() == first.keys()
    for n, t in first.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t), n
    assert buf.nbytes == sum(t.numel() * t.element_size() for t in first.values())

    mapped = load_file(buf.path)  # a reader done before the next write (as sync_weights waits)
    del mapped
    assert _fill(buf, second) == []
    again = load_file(buf.path)
    for n, t in second.items():
        assert torch.equal(again[n], t), f"{n} still holds the first write"
    assert not torch.equal(again["embed.weight"], first["embed.weight"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_write_reports_non_finite_values(tmp_path, bad):
    tensors = _tensors(0)
    buf = WeightBuffer(str(tmp_path / "w.safetensors"), layout_of(list(tensors.items())))
    tensors["proj.weight"][1, 2] = bad
    tensors["norm.weight"][0] = bad
    assert sorted(_fill(buf, tensors)) == ["norm.weight", "proj.weight"]


def test_unsupported_dtype_is_named(tmp_path):
    layout = layout_of([("rotary.freqs", torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="complex64"):
        WeightBuffer(str(tmp_path / "w.safetensors"), layout)


def test_layout_uses_the_full_shape_of_zero3_shards():
    shard = torch.nn.Parameter(torch.zeros(0))
    shard.ds_shape = torch.Size([4, 6])
    assert layout_of([("w", shard)]) == (("w", torch.float32, (4, 6)),)
