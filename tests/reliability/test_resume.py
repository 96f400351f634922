"""Crash and resume, end to end: the driver is killed (SIGKILL, whole process group) mid-run, the
resumed run then loses a learner rank, and a second resume finishes the plan. Every step of the
patched-together run must match an uninterrupted run with the same seed (which also shows that two
runs with the same seed agree).

The run's rollouts run two steps ahead under bounded staleness (``rollout.max_staleness=2``: each
step from the second on uses actions sampled one or two updates earlier, and a checkpoint carries
the ones already started, so each resume redoes its first steps as the run did) and validates in
the loop (before training and every 3 steps), a schedule the resumes keep; the sampled groups are
logged every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from runs import SMALL, compose, rows

from ekipl import checkpoint as ckpt

STEPS = 6
# What must match step by step: the sampled actions' rewards, the losses, the entropy and the
# number of sampled tokens (a different policy or sampler state changes them).
KEYS = (
    "reward/policy/mean",
    "reward/dataset/mean",
    "select/ratio/policy",
    "rollout/policy_tokens",
    "rollout/one_step_off",
    "rollout/staleness_mean",
    "actor/pg_loss",
    "actor/entropy",
    "actor/clip_frac",
)
ONE_STEP_OFF = [
    "rollout.max_staleness=2",
    "trainer.eval_before_train=true",
    "trainer.eval_every=3",
    "trainer.eval_limit=2",
    "trainer.eval_k=2",
    "trainer.log_samples_every=1",
]


def _same(a: dict, b: dict, step: int) -> None:
    if step == 0:  # validation before training: no step was taken
        assert a.keys() == b.keys(), step
        return
    for k in KEYS:
        assert k in a and k in b, (step, k)
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), f"step {step}, {k}: {a[k]} != {b[k]}"


def _samples(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]


def _check_reference(ref: dict, ref_dir) -> None:
    """Rollouts ahead from step 2 on, one update old at step 2 and two from step 3 (started two steps
    earlier); validation at steps 0, 3 and 6; samples logged every step, with advantages exactly
    where the action was selected."""
    assert sorted(ref) == list(range(STEPS + 1))
    assert [ref[s]["rollout/one_step_off"] for s in range(1, STEPS + 1)] == [0.0] + [1.0] * (STEPS - 1)
    assert [ref[s]["rollout/staleness_max"] for s in range(1, STEPS + 1)] == [0.0, 1.0] + [2.0] * (STEPS - 2)
    assert all(ref[s]["rollout/stale_dropped"] == 0.0 for s in range(1, STEPS + 1))
    assert [s for s in ref if "val/id/accuracy" in ref[s]] == [0, 3, 6]
    assert ref[0]["val/id/problems"] == 2 and "val/ood/pass@2" in ref[3]
    assert (ref_dir / "val" / "step_000003.id.jsonl").is_file()
    samples = _samples(ref_dir)
    assert sorted({x["step"] for x in samples}) == list(range(1, STEPS + 1))
    assert {x["source"] for x in samples} == {"policy", "dataset"}
    for x in samples:
        assert (x["advantage"] is not None) == x["selected"]


@pytest.mark.slow
def test_killed_driver_and_dead_learner_resume_to_the_uninterrupted_result(ray_local, tmp_path):
    from ekipl.cluster import TrainingError
    from ekipl.train import Hooks, run

    # 1. The driver, in its own process (and its own local Ray), killed once step 2 is saved. A
    # watcher thread does the kill, so the uninterrupted reference runs here meanwhile.
    out = tmp_path / "run"
    plan = [*SMALL, *ONE_STEP_OFF, f"trainer.steps={STEPS}"]
    overrides = [*plan, "trainer.save_every=1", f"trainer.output_dir={out}"]
    log_path = tmp_path / "killed.log"
    watch = {}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ekipl.train", *overrides],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes Ray's processes too
        )

        def kill_after_step_2():
            deadline = time.monotonic() + 500
            while not (out / "checkpoints" / "step_000002").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    watch["error"] = f"exited {proc.returncode} or timed out before step 2's checkpoint"
                    break
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)

        watcher = threading.Thread(target=kill_after_step_2, daemon=True)
        watcher.start()
        try:  # the uninterrupted reference, in this process, meanwhile
            ref_dir = tmp_path / "ref"
            summary = run(compose([*plan, f"trainer.output_dir={ref_dir}"]))
            assert summary["steps"] == STEPS
            ref = {r["step"]: r for r in rows(ref_dir)}
            _check_reference(ref, ref_dir)
            watcher.join(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert "error" not in watch, watch["error"] + "\n" + log_path.read_text()[-3000:]
    found = ckpt.latest(out / "checkpoints")
    assert found is not None
    killed_at = found[1]["step"]
    assert 2 <= killed_at < STEPS - 2, killed_at
    early = found[1]["early_rollout"]  # the next two steps' actions, sampled before the kill
    assert [e["step"] for e in early] == [killed_at + 1, killed_at + 2] and all(
        e["completions"] for e in early
    )
    for r in rows(out):  # the killed process's own steps equal the reference's: determinism
        _same(r, ref[r["step"]], r["step"])

    # 2. Resume; a learner rank dies after the first resumed step: a clear error, a valid checkpoint.
    def kill_rank(step, ctx):
        if step == killed_at + 1:
            import ray

            ray.kill(ctx["learner"].workers[1])

    with pytest.raises(TrainingError) as err:
        run(compose([*overrides, "trainer.resume=auto"]), hooks=Hooks(after_step=kill_rank))
    msg = str(err.value)
    assert "learner rank 1 died" in msg and f"step {killed_at + 1}" in msg and "trainer.resume=auto" in msg
    path, state = ckpt.latest(out / "checkpoints")
    assert state["step"] == killed_at + 1 and ckpt.verify(path)["step"] == killed_at + 1

    # 3. Resume again: the plan completes and every step matches the uninterrupted run.
    summary = run(compose([*overrides, "trainer.resume=auto"]))
    assert summary["start_step"] == killed_at + 1 and summary["steps"] == STEPS
    got = rows(out)
    assert [r["step"] for r in got] == list(range(STEPS + 1))  # validated before training once
    for r in got:
        _same(r, ref[r["step"]], r["step"])
    assert [r["step"] for r in got if "val/id/accuracy" in r] == [0, 3, 6]  # the schedule went on
    assert [x["step"] for x in _samples(out)] == [x["step"] for x in _samples(ref_dir)]  # each once
    assert (out / "policy" / "model.safetensors").is_file()

    # Starting over in a directory with checkpoints, without resume, is refused, naming the key.
    from ekipl.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.resume"):
        run(compose(overrides))
