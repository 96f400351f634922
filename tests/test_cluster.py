"""Operation on a Ray cluster: ``launch/submit.py`` (``ray job submit``) sends a tiny run to a
simulated 2-node cluster (``ray.cluster_utils.Cluster``: a head and a worker node, started by this
test), with the auxiliary vLLM engine pinned to one labelled node and the learner ranks to the
other; the policy engine sits with the auxiliary engine, away from learner rank 0, so new weights
must cross nodes. One run covers job submission and placement by custom resources."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from runs import rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def submit():
    """launch/submit.py as a module."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import submit
    finally:
        sys.path.pop(0)
    return submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_logs(cluster, chars: int = 3000) -> str:
    """The tails of the session's dashboard-agent logs and of the job head's (where a missing agent
    is reported)."""
    logs = Path(cluster.head_node.get_logs_dir_path())
    files = sorted(logs.glob("dashboard_agent*")) + sorted(logs.glob("dashboard_JobHead.*"))
    return "".join(f"\n--- {f.name} ---\n{f.read_text(errors='replace')[-chars:]}" for f in files)


@pytest.fixture(scope="module")
def cluster():
    """A simulated 2-node Ray cluster: a head (label learner_node) and a worker (aux_node,
    policy_node), each declaring 4 logical GPUs, with a dashboard for job submission."""
    from ray.cluster_utils import Cluster

    dashboard = _free_port()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 3,
            "num_gpus": 4,
            "include_dashboard": True,
            "dashboard_port": dashboard,
            "resources": {"learner_node": 2},
            # The head's dashboard agent listens on 52365 by default, which the session's own local
            # Ray (other tests) already holds. 0 lets the agent bind a port itself and publish it; a
            # port picked here beforehand could be taken by another process before the agent starts
            # (CI once saw the job agent never come up, with a port picked that way).
            "dashboard_agent_listen_port": 0,
        },
    )
    try:
        cluster.add_node(
            num_cpus=3, num_gpus=4, resources={"aux_node": 2, "policy_node": 1}, dashboard_agent_listen_port=0
        )
        cluster.wait_for_nodes()
        cluster.dashboard = dashboard
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_placement_groups_and_no_silent_cpu_on_a_cluster_with_logical_gpus(cluster, tiny_vlm, tmp_path):
    """The run's placement groups on the simulated cluster: actors of the real shapes land in their
    bundles (learners and the policy engine on one node, the TP=2 auxiliary engine's two workers on
    one node with a GPU each); a policy engine and a learner rank given a GPU they cannot use stop
    at start-up, saying what they saw; ``ekipl plan --address`` lays the 2B preset out on it."""
    plan_json = tmp_path / "plan.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "cluster_placement.py"),
            cluster.address,
            str(tiny_vlm),
            str(plan_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(line.removeprefix("RESULT "))
    table, probes = out["table"], out["probes"]
    policy_node = table["learner/0"]["nodes"][0]
    assert {table[a]["nodes"][0] for a in ("learner/0", "learner/1", "policy/0")} == {policy_node}
    assert [table[a]["bundles"] for a in ("learner/0", "learner/1", "policy/0")] == [[0], [1], [2]]
    assert table["aux/big/0"]["group"] == "aux:big:0" and len(set(table["aux/big/0"]["nodes"])) == 1
    assert out["aux_bundles"] == [0, 1]
    for name, (node, gpus) in probes.items():  # each probe where the group table put its bundle
        assert node == table[name]["nodes"][0], name
        assert len(gpus) == (0 if name.startswith("aux/") else 1), (name, gpus)
    gpu_ids = [g for name in ("learner/0", "learner/1", "policy/0") for g in probes[name][1]]
    assert len(set(gpu_ids)) == 3  # one GPU each, none shared
    workers = out["aux_workers"]
    assert {n for n, _ in workers} == set(table["aux/big/0"]["nodes"]) and len(
        {g[0] for _, g in workers}
    ) == 2
    for key in ("engine_error", "learner_error"):
        msg = out[key]
        assert msg and "cannot use CUDA" in msg and "torch.cuda.is_available()=False" in msg, (key, msg)
        assert "CUDA_VISIBLE_DEVICES=" in msg and "built for CUDA" in msg
    assert "policy/0 asked for 1 GPU(s)" in out["engine_error"]
    assert re.search(
        r"learner rank \d asked for 1 GPU\(s\)", out["learner_error"]
    )  # whichever rank stops first
    assert out["plan_rc"] == 0 and "fits: 8 of 8 GPUs of 80 GiB used" in out["plan"], out["plan"]
    rows = json.loads(plan_json.read_text())
    assert len({r["node"] for r in rows if r["group"] == "policy"}) == 1
    assert len({r["node"] for r in rows if r["group"].startswith("aux:")}) == 1
    assert {r["node"] for r in rows if r["group"] == "policy"} != {
        r["node"] for r in rows if r["group"].startswith("aux:")
    }


@pytest.mark.slow
def test_end_to_end_as_a_ray_job_on_a_two_node_cluster(submit, cluster, tmp_path):
    """A few EKIPL steps through every real component -- a policy vLLM engine, an auxiliary vLLM
    engine on another tiny VLM, recorded traces, 2 ZeRO ranks on gloo, W&B offline -- submitted
    with launch/submit.py; then the exported policy is loaded by transformers."""
    dashboard = cluster.dashboard
    learner_node = cluster.head_node
    aux_node = next(iter(cluster.worker_nodes))
    out = tmp_path / "job"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    forward = ["--env", "EKIPL_CACHE"] if "EKIPL_CACHE" in env else []
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "--address",
            f"http://127.0.0.1:{dashboard}",
            "--python",
            sys.executable,
            "--submission-id",
            "ekipl-test-job",
            # Simulated nodes share one session directory on this disk, so each node's runtime
            # env agent would unpack a shipped working dir into the same place, racing the
            # others; run the installed ekipl instead (as a Docker-image cluster does).
            "--working-dir",
            "none",
            *forward,
            "--",
            "+experiment=cpu_demo",
            "trainer.steps=2",
            "trainer.save_every=0",
            "data.synthetic_size=8",
            "logger.mode=offline",
            f"trainer.output_dir={out}",
            "+aux.aux_b.resources.aux_node=1",
            "+learner.resources.learner_node=1",
            "+model.engine_resources.policy_node=1",
            # the policy engine away from the learner ranks: the weights cross nodes
            "placement.strategy=PACK",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=tmp_path,
    )
    # the job's own log is streamed to stdout; the agents' logs say why a job never started
    assert r.returncode == 0, r.stdout[-4000:] + _agent_logs(cluster)
    assert "ray job submit" in r.stdout and "succeeded" in (r.stdout + r.stderr).lower()
    # Ray's CLI still says it submitted the job as submit.py expects (the job's log then streams)
    assert submit.SUBMITTED.search(r.stdout)
    placement = json.loads((out / "placement.json").read_text())
    assert placement["aux"]["aux_b"] == [aux_node.node_id]
    assert placement["learner"] == [learner_node.node_id] * 2
    assert placement["policy"] == [aux_node.node_id]
    got = rows(out)
    assert [row["step"] for row in got] == [1, 2]
    # the policy engine is not on learner rank 0's node: weights went through the object store
    assert all(row["sync/remote_engines"] == 1 and row["sync/bytes"] > 0 for row in got)
    last = got[-1]
    for key in (
        "reward/policy/mean",
        "reward/aux_b/mean",
        "reward/dataset/mean",
        "select/ratio/dataset",
        "select/aux_win_rate",
        "rollout/policy_pass_rate",
        "actor/pg_loss",
        "actor/entropy",
        "timing/rollout",
        "timing/reward",
        "timing/update",
        "timing/weight_sync",
        "timing/step",
    ):
        assert key in last, key
    assert last["reward/dataset/accuracy"] == 1.0
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run missing"
    # The exported policy loads in transformers (test_own_task evaluates an export through vLLM).
    from ekipl.models import hf

    model = hf.load_model(out / "policy")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_submit_builds_the_ray_job_command_and_refuses_to_ship_secrets(submit, capsys, monkeypatch):
    assert submit.main(["--dry-run", "--address", "http://head:8265", "--", "+experiment=counting_2b"]) == 0
    out, err = capsys.readouterr()
    cmd = out.strip().removeprefix("+ ")
    assert " job submit --address http://head:8265 --runtime-env-json " in cmd
    runtime_env = json.loads(cmd.split("--runtime-env-json ", 1)[1].split("' -- ", 1)[0].strip("'"))
    assert runtime_env["working_dir"] == str(ROOT) and ".venv" in runtime_env["excludes"]
    assert cmd.endswith(
        "-- python -m ekipl.train trainer.ray_address=auto trainer.ray_num_cpus=null +experiment=counting_2b"
    )
    assert "absolute trainer.output_dir" in err
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-ship")
    with pytest.raises(SystemExit, match="refusing to put OPENAI_API_KEY"):
        submit.main(["--dry-run", "--env", "OPENAI_API_KEY", "--", "trainer.output_dir=/x"])
    assert "sk-do-not-ship" not in capsys.readouterr().out


def _fake_ray_cli(tmp_path, refusals: int) -> list[str]:
    """A stand-in for ``ray job submit`` (a simulated fault): its first ``refusals`` runs fail as a
    head without a job agent does, with a traceback; later ones submit and stream the job's log."""
    count = tmp_path / "attempts"
    script = f"""
import pathlib, sys
p = pathlib.Path({str(count)!r})
n = int(p.read_text()) if p.exists() else 0
p.write_text(str(n + 1))
if n < {refusals}:
    print("Traceback (most recent call last):")
    print("RuntimeError: Request failed with status code 500: No available agent to submit job")
    sys.exit(1)
print("Job 'j' submitted successfully")
print("the job's log: No available agent to submit job")  # the job's words, no refusal
sys.exit(3)  # the job failed: a job that was created is never submitted again
"""
    return [sys.executable, "-c", script]


def test_submit_retries_only_a_refused_submission_and_shows_it_as_one_line(submit, tmp_path, capsys):
    rc = submit.submit_with_retries(_fake_ray_cli(tmp_path, refusals=2), dict(os.environ), wait_s=60)
    out, err = capsys.readouterr()
    assert rc == 3 and (tmp_path / "attempts").read_text() == "3"  # 2 refused, then one job, not rerun
    assert err.count("job agent is not up yet") == 2 and "Traceback" not in out
    assert out == "Job 'j' submitted successfully\nthe job's log: No available agent to submit job\n"
    # Past the deadline the refusal is the answer, shown whole.
    (tmp_path / "attempts").unlink()
    assert submit.submit_with_retries(_fake_ray_cli(tmp_path, refusals=5), dict(os.environ), wait_s=0) == 1
    out, err = capsys.readouterr()
    assert "Traceback" in out and "No available agent" in out and not err


def test_slurm_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
