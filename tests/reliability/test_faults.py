"""Faults in a live run: an auxiliary vLLM actor killed at a random step, a flaky API endpoint,
non-finite losses, bad rows and images met mid-run, and secrets that must never be written."""

from __future__ import annotations

import logging
import math
import random

import pytest
from openai_stub import SECRET
from runs import SMALL, compose, rows


@pytest.mark.slow
def test_killed_aux_actor_and_flaky_api_are_survived_and_the_key_is_never_written(
    ray_local, tmp_path, stub_server, monkeypatch, caplog, capfd
):
    """cpu_demo (policy + a second tiny VLM + traces) plus an ``openai`` source on a local stub that
    answers 429, 500, garbage and a timeout first. The aux VLM actor is killed after a random step;
    once the run has logged the outage, the test waits for Ray to bring the actor back (a real
    restart takes ~12 s, longer than this run's steps) and the last steps must use it again. (The
    coordinator catches an aux call's failure in one place, whether the actor died during the call
    or before it.)"""
    import ray

    from ekipl.train import Hooks, run

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    stub_server.script[:] = ["429", "500", "garbage", "sleep"]
    kill_step = random.Random().randint(1, 2)
    state = {"restarted_at": None}

    def after_step(step, ctx):
        src = next(s for s in ctx["sources"] if s.name == "aux_b")
        if step == kill_step:
            ray.kill(src.actors[0], no_restart=False)
        failed = ctx["coordinator"].failures["aux_b"] > 0
        if failed and state["restarted_at"] is None:
            src.ready()  # wait for Ray's restart
            state["restarted_at"] = step

    out = tmp_path / "run"
    cfg = compose(
        [
            "+experiment=cpu_demo",
            "data.synthetic_size=16",
            "trainer.steps=6",
            "trainer.save_every=3",
            "trainer.aux_cache=false",  # every step asks the aux actor anew
            "learner.world_size=1",  # the faults are the sources'; two ranks add nothing here
            "logger.mode=offline",
            f"trainer.output_dir={out}",
            "+aux.gpt.kind=openai",
            f"+aux.gpt.base_url={stub_server.url}",
            "+aux.gpt.model=gpt-4o",
            "+aux.gpt.timeout_s=0.5",
            "+aux.gpt.backoff_s=0.01",
            "+aux.gpt.max_retries=5",
        ]
    )
    with caplog.at_level(logging.INFO):
        summary = run(cfg, hooks=Hooks(after_step=after_step))
    assert summary["steps"] + summary["skipped_steps"] == 6, f"killed after step {kill_step}"
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    # The outage was logged and counted, and the restarted actor was used again afterwards.
    assert state["restarted_at"] is not None, f"killing the actor after step {kill_step} went unnoticed"
    assert "aux source 'aux_b' failed" in caplog.text
    assert got[-1]["aux/failures/aux_b"] >= 1
    after = [r for r in got if r["step"] > state["restarted_at"] + 1]
    assert after and all("reward/aux_b/mean" in r for r in after), (kill_step, state)
    # The API source survived 429/500/garbage/timeout with retries and contributed actions.
    assert "HTTP 429" in caplog.text and "HTTP 500" in caplog.text
    assert all("reward/gpt/mean" in r for r in got)
    assert stub_server.seen and all(s["auth"] == f"Bearer {SECRET}" for s in stub_server.seen)
    # The key went to the endpoint and nowhere else: no log line, stdout/stderr, W&B file,
    # checkpoint, config or metrics file contains it.
    captured = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out and SECRET not in captured.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any("checkpoints" in p.parts for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def _broken_val_file(tmp_path):
    """A held-out split whose second row's image is corrupt (found only when validation reads it)."""
    import json

    from ekipl.tasks.synth import make_dataset

    paths = make_dataset("counting", tmp_path / "val", n_train=1, n_test=2, seed=1)
    rows_ = json.loads(paths["test_id"].read_text())
    (paths["test_id"].parent / rows_[1]["image"]).write_bytes(b"not a png")
    return paths["test_id"]


def _bad_rows_file(tmp_path):
    """The synthetic counting set, plus a malformed row and a row with a corrupt image."""
    import json

    from ekipl.tasks.synth import make_dataset

    paths = make_dataset("counting", tmp_path / "data", n_train=8, n_test=4, seed=0)
    train = json.loads(paths["train"].read_text())
    corrupt = paths["train"].parent / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    bad_image = {**train[0], "id": "corrupt-1", "image": str(corrupt)}
    no_answer = {k: v for k, v in train[1].items() if k not in ("answer", "solution")} | {"id": "no-answer"}
    rows_ = [train[0], bad_image, no_answer, *train[1:]]
    path = paths["train"].parent / "with_bad_rows.json"  # image paths are relative to it
    path.write_text(json.dumps(rows_))
    return path


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop_the_run(ray_local, tmp_path, caplog):
    """From step 2 on the advantages are made NaN: each such step is skipped and counted, the
    learner's weights and the engine's log-probs stay those of step 1, and after
    ``max_nonfinite_skips`` in a row the run stops with a message. The data file also holds a
    malformed row (skipped at load) and a corrupt image (skipped when its batch comes). Validation
    runs every step on a split whose image is corrupt: it fails, is logged and counted, and the run
    goes on."""
    import ray

    from ekipl.cluster import TrainingError
    from ekipl.train import Hooks, run

    seen: dict[int, tuple] = {}

    def before_update(step, batch):
        if step >= 2:
            batch.advantages.fill_(math.nan)

    def after_step(step, ctx):
        engine = ctx["router"].actors[0]
        logp = ray.get(engine.score.remote([1, 2, 3, 4, 5, 6], [7, 8, 9, 10]))
        seen[step] = (ctx["learner"].state_dict(), logp)

    out = tmp_path / "run"
    cfg = compose(
        [
            *SMALL,
            f"data.train_file={_bad_rows_file(tmp_path)}",
            "data.task=counting",
            "data.skip_bad_rows=true",
            "data.shuffle=false",
            "trainer.steps=5",
            "trainer.max_nonfinite_skips=2",
            f"trainer.output_dir={out}",
            f"+data.val_files.broken={_broken_val_file(tmp_path)}",
            "trainer.eval_every=1",
        ]
    )
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingError, match="2 consecutive steps"):
        run(cfg, hooks=Hooks(before_update=before_update, after_step=after_step))
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[0]["actor/skipped_step"] == 0 and math.isfinite(got[0]["actor/pg_loss"])
    for r, n in zip(got[1:], (1, 2), strict=True):
        assert r["actor/skipped_step"] == 1 and r["timing/weight_sync"] == 0.0
        assert r["trainer/consecutive_nonfinite_skips"] == n and r["actor/nonfinite_loss"] >= 1
    w1, lp1 = seen[1]
    w3, lp3 = seen[3]
    assert w1.keys() == w3.keys() and all(w1[k].equal(w3[k]) for k in w1), "a skipped step changed weights"
    assert lp1 == lp3 and all(math.isfinite(x) for x in lp3), "the engine saw changed or non-finite weights"
    # bad input: the malformed row at load time, the corrupt image when its batch came
    assert "skipped 1 of 10 rows" in caplog.text and "field 'answer'" in caplog.text
    assert "corrupt image" in caplog.text and got[0]["data/bad_rows_skipped"] == 1
    # a failed validation: logged and counted at every step, never a stop
    assert caplog.text.count("validation failed") == 3 and all(r["val/failed"] == 1.0 for r in got)
