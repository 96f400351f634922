"""Stage-1 CoT-SFT through the same learner (as a warm start, ``python -m ekipl.sft`` in a
subprocess): the traces' NLL falls, the export loads, the build is cached."""

from __future__ import annotations

import pytest
from runs import compose


def test_sft_without_traces_is_a_data_error(tmp_path, red_image):
    import json

    from ekipl.sft import run
    from ekipl.tasks.sample import DataError

    red_image.save(tmp_path / "a.png")
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "a", "image": "a.png", "problem": "How many?", "answer": "1"}]))
    cfg = compose([f"data.train_file={data}", "data.task=counting", f"trainer.output_dir={tmp_path}/o"])
    with pytest.raises(DataError, match="no row has a 'cot' trace"):
        run(cfg)


@pytest.mark.slow
def test_sft_warm_start_lowers_the_trace_nll_exports_a_policy_and_is_cached(tmp_path, monkeypatch, tiny_vlm):
    """A warm start runs ``python -m ekipl.sft`` once (the traces' NLL falls, the export loads); the
    next use is the cached directory; a changed recipe, or a changed generator of its rows, is a new
    build."""
    import json

    from ekipl import warm
    from ekipl.models import hf

    # the whole 4-row set every step, so the NLL must fall
    recipe = warm.WarmStart(base="tiny-qwen2-vl", steps=4, prompts_per_step=4, data_size=4, lr=1e-3)
    monkeypatch.setitem(warm.WARM_STARTS, "test-warm", recipe)
    # the SFT subprocess resolves its base where the session built it
    monkeypatch.setenv("EKIPL_CACHE", str(tiny_vlm.parent.parent))
    path = warm.build_warm("test-warm", root=tmp_path)
    assert json.loads((path / "ekipl_warm.json").read_text())["recipe"]["steps"] == 4
    nll = [json.loads(x)["actor/nll"] for x in (path / "sft_metrics.jsonl").read_text().splitlines()]
    assert len(nll) == 4 and nll[-1] < 0.9 * nll[0], nll
    assert all(later < earlier for earlier, later in zip(nll, nll[1:], strict=False)), nll
    model = hf.load_model(path)
    assert sum(p.numel() for p in model.parameters()) > 0 and hf.load_processor(path) is not None
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert warm.build_warm("test-warm", root=tmp_path) == path  # cached: no second build
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    changed = warm.WarmStart(base="tiny-qwen2-vl", steps=5)
    assert warm._digest("test-warm", changed, 0) not in path.name  # a new recipe is a new build
    from ekipl.tasks import synth

    monkeypatch.setitem(synth.VERSIONS, "counting", synth.VERSIONS["counting"] + 1)
    assert warm._digest("test-warm", recipe, 0) not in path.name  # new rows: a new build
    with pytest.raises(ValueError, match="unknown warm start 'nope'"):
        warm.build_warm("nope", root=tmp_path)


def test_a_warm_start_that_freezes_its_vision_tower_trains_with_it_frozen_and_is_its_own_build(tmp_path):
    """``freeze_vision`` reaches the SFT run as ``learner.freeze_vision=true`` and names a new build;
    a recipe at the default keeps the name it had before the field existed (counting's builds stay
    valid); the geometry and TRANCE pairs freeze their tower, counting's do not."""
    import dataclasses

    from ekipl import warm

    plain = warm.WarmStart(base="tiny-qwen2-vl")
    frozen = dataclasses.replace(plain, freeze_vision=True)
    assert "learner.freeze_vision=true" in warm.sft_overrides(frozen, 0, tmp_path, "b")
    assert not any("freeze_vision" in x for x in warm.sft_overrides(plain, 0, tmp_path, "b"))
    assert warm._digest("w", frozen, 0) != warm._digest("w", plain, 0)
    # the name counting's policy warm start had before the field (learn-qwen2-vl-sft-s0-e6676bc10495)
    assert warm._digest("learn-qwen2-vl-sft", warm.WARM_STARTS["learn-qwen2-vl-sft"], 0) == "e6676bc10495"
    # and geometry's, whose runs are in bench/results (the tokenizer's corpus field left it alone)
    geometry = "learn-qwen2-vl-geometry-sft"
    assert warm._digest(geometry, warm.WARM_STARTS[geometry], 0) == "7d008850c858"
    for name, recipe in warm.WARM_STARTS.items():
        assert recipe.freeze_vision == (recipe.task != "counting"), name
