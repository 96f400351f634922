"""Model families (ekipl/models/families.py): Qwen2-VL, Qwen2.5-VL and Qwen3-VL through the whole
path. Tiny models of each are built from a seed; the learner's packed rows equal its padded rows
(values and gradients) with one and two images per prompt and a text-only row beside them; each new
family trains 2 steps of the CPU demo on two-image TRANCE prompts with packing, its engine's
log-probs equal to the learner's after a sync, validates one-image prompts through its engine, and
its HF export runs through ekipl.eval."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from runs import compose, rows

from ekipl.models.families import FAMILIES, family_of, model_type

TINY = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl"}
NEW = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="session")
def family_vlm(model_root):
    from ekipl.models.tiny import build_tiny

    return lambda family: build_tiny(TINY[family], seed=0, root=model_root)


@pytest.fixture(scope="module")
def trance_data(tmp_path_factory):
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.synth import make_dataset

    paths = make_dataset("trance", tmp_path_factory.mktemp("trance"), n_train=4, n_test=4, seed=0)
    return load_task_file(paths["train"])


@pytest.mark.parametrize("family", sorted(TINY))
def test_each_tiny_model_is_of_its_family_with_its_processor(family_vlm, family):
    from ekipl.models import hf

    path = family_vlm(family)
    assert model_type(path) == family and family_of(family) is FAMILIES[family]
    proc = hf.load_processor(path)
    assert type(proc).__name__ == FAMILIES[family].processor_cls
    assert proc.image_processor.patch_size == FAMILIES[family].patch_size
    model = hf.load_model(path)
    assert FAMILIES[family].vision_tower(model) is model.model.visual


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("family", sorted(TINY))
def test_packed_rows_equal_padded_rows(family_vlm, counting_data, trance_data, family, images):
    """learner.pack_sequences on the family: M-RoPE positions (Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's
    interleaved layout) carried across packed sequences, one image per prompt and two (TRANCE); a
    text-only row among them."""
    from test_learner import advantages_for, make_groups

    from ekipl.learner.batch import collate
    from ekipl.learner.logprobs import sequence_logprobs
    from ekipl.models import hf

    path = family_vlm(family)
    proc, model = hf.load_processor(path), hf.load_model(path).eval()
    data = counting_data if images == 1 else trance_data
    samples = [data[i] for i in range(3)] + [dataclasses.replace(data[3], image_paths=())]
    groups = make_groups(proc, samples, n_groups=4, g=2, seed=1)
    b = collate(groups, proc, advantages_for(groups))
    assert b.images == [images] * 6 + [0, 0]
    m = b.completion_mask.bool()
    runs = []
    for pack in (False, True):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, b, with_entropy=True, chunk_tokens=7, pack=pack)
        (logp[m] * torch.linspace(-1, 1, int(m.sum()))).sum().backward()  # a row mixed into another shows
        runs.append(
            (logp, ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (want, want_ent, want_g), (got, got_ent, got_g) = runs
    assert torch.allclose(got[m], want[m], atol=1e-5) and bool((got[~m] == 0).all())
    assert torch.allclose(got_ent[m], want_ent[m], atol=1e-4)
    assert want_g.keys() == got_g.keys() and any(".visual." in n for n in want_g)
    for n, g in want_g.items():
        assert torch.allclose(got_g[n], g, atol=1e-5, rtol=1e-4), n


def test_a_model_type_no_family_names_is_refused_at_start_up(tmp_path, monkeypatch, capsys):
    from ekipl.train import main

    model = tmp_path / "llava"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    monkeypatch.setattr(
        sys, "argv", ["ekipl.train", f"model.path={model}", f"trainer.output_dir={tmp_path}/o"]
    )
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert (
        e.value.code == 2 and f"ekipl: error: model.path: {model}: model type 'llava' is not supported" in err
    )
    assert all(k in err for k in TINY), err  # it names the supported families


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW)
def test_a_family_runs_the_whole_path(ray_local, family_vlm, tmp_path, family):
    """2 steps of the CPU demo with the family's tiny policy on two-image TRANCE prompts (one ZeRO-2
    rank, packed rows, the recorded traces as the auxiliary source), validation on one-image
    counting prompts through the policy engine, the HF export, then ekipl.eval on Qwen3-VL's (the
    export's layout is the family's own; test_own_task runs ekipl.eval on a Qwen2-VL one)."""
    from ekipl.eval import main as eval_main
    from ekipl.tasks.synth import make_dataset
    from ekipl.train import run

    counting = make_dataset("counting", tmp_path / "data", n_train=4, n_test=4, seed=0)["test_id"]
    out = tmp_path / "run"
    summary = run(
        compose(
            [
                "+experiment=cpu_demo",
                "aux.aux_b=null",
                f"model.path={family_vlm(family)}",
                "data.synthetic_task=trance",
                "data.synthetic_size=8",
                "rollout.max_tokens=16",
                "learner.pack_sequences=true",
                "learner.world_size=1",
                "trainer.steps=2",
                "trainer.save_every=0",
                "trainer.eval_every=2",
                "trainer.eval_limit=2",
                f"+data.val_files.counting={counting}",
                "logger.mode=disabled",
                f"trainer.output_dir={out}",
            ]
        )
    )
    got = rows(out)
    assert summary["steps"] == 2 and [r["step"] for r in got] == [1, 2]
    for r in got:  # step 2 samples with the weights synced after step 1
        assert r["actor/rollout_logprob_diff"] < 1e-3, (family, r["step"], r["actor/rollout_logprob_diff"])
        assert r["actor/padding_frac"] == 0.0 and r["select/ratio/dataset"] > 0
    assert got[-1]["val/counting/problems"] == 2.0
    assert model_type(out / "policy") == family
    if family != "qwen3_vl":  # one family's export through ekipl.eval keeps the suite short
        return
    code = eval_main(
        [
            "--model",
            f"trained={out / 'policy'}",
            "--split",
            f"id={counting}",
            "--limit=2",
            "--k=1",
            "--max-tokens=4",
            "--dtype=float32",
            f"--out={tmp_path / 'eval'}",
        ]
    )
    assert code == 0
    (row,) = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert row["model"] == "trained" and row["problems"] == 2
