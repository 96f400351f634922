"""Bad data and bad config through the real ``python -m ekipl.train`` entry point (Hydra's main,
run in this process): exit code 2 and a message naming the file/row/field or the config key."""

from __future__ import annotations

import json
import sys

import pytest
from bad_rows import malformed_rows

GOOD = {"id": "r0", "image": "img.png", "problem": "How many?", "answer": "3"}


def _entry(monkeypatch, capsys, *overrides) -> tuple[int, str]:
    from ekipl.train import main

    monkeypatch.setattr(sys, "argv", ["ekipl.train", *overrides])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def data_dir(tmp_path, red_image):
    red_image.save(tmp_path / "img.png")
    return tmp_path


ROWS = [*malformed_rows(GOOD), ({**GOOD}, "id", "duplicate id")]


@pytest.mark.parametrize("row,field,message", ROWS, ids=[f"{r[1]}-{r[2][:12]}" for r in ROWS])
def test_malformed_row_exits_2_naming_file_row_and_field(monkeypatch, capsys, data_dir, row, field, message):
    path = data_dir / "train.json"
    path.write_text(json.dumps([GOOD, row]))
    code, err = _entry(
        monkeypatch,
        capsys,
        f"data.train_file={path}",
        "data.task=counting",
        f"trainer.output_dir={data_dir / 'out'}",
    )
    assert code == 2, err
    assert f"ekipl: error: {path}, row 1" in err and f"field {field!r}" in err and message in err, err


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "invalid JSON at line 1"),
        ('{"rows": 1}', "expected a JSON list"),
        ("[]", "no usable rows"),
    ],
)
def test_unreadable_data_file_exits_2(monkeypatch, capsys, data_dir, content, message):
    path = data_dir / "train.json"
    path.write_text(content)
    code, err = _entry(monkeypatch, capsys, f"data.train_file={path}", f"trainer.output_dir={data_dir}/o")
    assert code == 2 and message in err and str(path) in err, err


def test_all_rows_bad_under_skip_bad_rows_exits_2_with_the_count(monkeypatch, capsys, data_dir):
    path = data_dir / "train.json"
    path.write_text(json.dumps([{**GOOD, "image": "gone.png"}, {"id": "x"}]))
    code, err = _entry(
        monkeypatch,
        capsys,
        f"data.train_file={path}",
        "data.skip_bad_rows=true",
        f"trainer.output_dir={data_dir}",
    )
    assert code == 2 and "no usable rows (2 skipped of 2)" in err, err


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["learner.nope=1"], "learner.nope"),  # unknown key (Hydra, against the typed schema)
        (["learner.lr=fast"], "learner.lr"),  # wrong type
        (["rollout.group_size=50"], "rollout.group_size"),  # impossible: G > candidates
        (["learner.world_size=64"], "learner.world_size"),  # more ranks than actions per step
        (["trainer.resume=/no/such/checkpoint"], "trainer.resume"),
        (["+aux.big.kind=vllm", "+aux.big.model=/no/such/model"], "aux.big.model"),
    ],
)
def test_bad_config_names_the_key(monkeypatch, capsys, tmp_path, overrides, key):
    code, err = _entry(monkeypatch, capsys, *overrides, f"trainer.output_dir={tmp_path}")
    assert code != 0 and key in err, err
