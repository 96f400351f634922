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
