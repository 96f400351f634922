"""Checkpoint files: never half-written, verified when loaded, corrupt ones passed over."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ekipl import checkpoint as ckpt


def _writer(payload: bytes):
    def write(d):
        d.mkdir()
        (d / "rank0.pt").write_bytes(payload)
        (d / "sub").mkdir()
        (d / "sub" / "rank1.pt").write_bytes(payload[::-1])

    return write


def test_save_then_verify_round_trips_the_state(tmp_path):
    path = ckpt.save(tmp_path, 3, _writer(b"weights" * 100), {"sampler_position": 6})
    assert path.name == "step_000003"
    state = ckpt.verify(path)
    assert state == {"step": 3, "sampler_position": 6}
    assert ckpt.latest(tmp_path) == (path, state)


def test_a_crash_while_saving_leaves_no_checkpoint_and_the_previous_one_stays_newest(tmp_path):
    good = ckpt.save(tmp_path, 1, _writer(b"a" * 10), {})

    def dies(d):
        _writer(b"b" * 10)(d)
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 2, dies, {})
    assert ckpt.checkpoints(tmp_path) == [good]
    assert not list(tmp_path.glob(".tmp-*")), "the half-written directory was left behind"
    assert ckpt.latest(tmp_path)[0] == good


def test_a_leftover_temp_dir_from_a_killed_process_is_ignored_then_cleaned(tmp_path):
    stale = tmp_path / ".tmp-step_000005-deadbeef"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    assert ckpt.latest(tmp_path) is None  # not a checkpoint
    ckpt.save(tmp_path, 6, _writer(b"x"), {})
    assert not stale.exists()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: (p / "learner" / "rank0.pt").write_bytes(b"weights" * 99 + b"weightX"), "sha256"),
        (lambda p: (p / "learner" / "sub" / "rank1.pt").write_bytes(b"short"), "bytes"),
        (lambda p: (p / "learner" / "rank0.pt").unlink(), "missing"),
        (lambda p: (p / "MANIFEST.json").unlink(), "no MANIFEST.json"),
        (lambda p: (p / "state.json").write_text('{"step": 9}'), "sha256"),
    ],
)
def test_corrupt_checkpoints_are_named_and_the_previous_one_is_used(tmp_path, damage, message):
    old = ckpt.save(tmp_path, 1, _writer(b"weights" * 100), {}, keep=0)
    new = ckpt.save(tmp_path, 2, _writer(b"weights" * 100), {}, keep=0)
    damage(new)
    with pytest.raises(ckpt.CheckpointError, match=message) as e:
        ckpt.verify(new)
    assert str(new) in str(e.value)
    assert ckpt.latest(tmp_path)[0] == old


def test_only_the_newest_are_kept_and_a_step_saved_again_replaces_the_old(tmp_path):
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, _writer(bytes([step])), {"v": step}, keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    again = ckpt.save(tmp_path, 3, _writer(b"new"), {"v": "again"}, keep=2)
    assert ckpt.verify(again)["v"] == "again"
    manifest = json.loads((again / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"learner/rank0.pt", "learner/sub/rank1.pt", "state.json"}


def test_rng_state_round_trips_through_json():
    random.seed(1)
    torch.manual_seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (random.random(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
