"""Stage-1 CoT-SFT through the same learner: the traces' NLL falls, the export loads."""

from __future__ import annotations

import pytest
from runs import compose, rows


@pytest.mark.slow
def test_sft_lowers_the_trace_nll_and_exports_a_loadable_policy(ray_local, tmp_path):
    from ekipl.sft import run

    out = tmp_path / "sft"
    cfg = compose(
        [
            "+experiment=cpu_demo",
            "data.synthetic_size=4",
            "data.prompts_per_step=4",  # the whole set every step: the NLL must fall
            "trainer.steps=4",
            "learner.lr=1e-3",
            "logger.mode=disabled",
            f"trainer.output_dir={out}",
        ]
    )
    summary = run(cfg)
    assert summary["steps"] == 4
    nll = [r["actor/nll"] for r in rows(out)]
    assert len(nll) == 4 and nll[-1] < 0.9 * nll[0], nll
    assert all(later < earlier for earlier, later in zip(nll, nll[1:], strict=False)), nll
    from ekipl.models import hf

    model = hf.load_model(out / "policy")
    assert sum(p.numel() for p in model.parameters()) > 0


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
def test_warm_start_is_built_once_by_sft_and_cached_by_recipe(tmp_path, monkeypatch):
    """A warm start runs ``python -m ekipl.sft`` once; the next use is the cached directory; a
    changed recipe or a warm start built on another is a new build."""
    import json

    from ekipl import warm
    from ekipl.models import hf

    tiny = warm.WarmStart(base="tiny-qwen2-vl", steps=2, prompts_per_step=2, data_size=4)
    monkeypatch.setitem(warm.WARM_STARTS, "test-warm", tiny)
    monkeypatch.setitem(warm.WARM_STARTS, "test-warm-on", warm.WarmStart(base="test-warm", steps=1))
    monkeypatch.setenv("EKIPL_CACHE", str(tmp_path / "cache"))  # the SFT subprocess builds its base here
    path = warm.build_warm("test-warm", root=tmp_path)
    meta = json.loads((path / "ekipl_warm.json").read_text())
    assert meta["recipe"]["steps"] == 2 and len((path / "sft_metrics.jsonl").read_text().splitlines()) == 2
    assert hf.load_model(path) is not None and (path / "preprocessor_config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert warm.build_warm("test-warm", root=tmp_path) == path  # cached: no second build
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setitem(warm.WARM_STARTS, "test-warm", warm.WarmStart(base="tiny-qwen2-vl", steps=3))
    assert warm._digest("test-warm", warm.WARM_STARTS["test-warm"], 0) not in path.name  # a new recipe
    with pytest.raises(ValueError, match="unknown warm start 'nope'"):
        warm.build_warm("nope", root=tmp_path)
