#!/usr/bin/env python
"""Submit an ekipl run to a Ray cluster with ``ray job submit``.

    python launch/submit.py --address http://HEAD:8265 -- +experiment=counting_2b \
        data.train_file=/data/reason_rft/counting/train.json data.image_root=/data/reason_rft

Everything after ``--`` is Hydra overrides for ``ekipl.train`` (or ``ekipl.sft`` with
``--module ekipl.sft``). The repository is shipped as the job's working dir (without virtual
environments, outputs, caches and weights); the cluster's Python must already have ekipl's
dependencies (the Docker images in docker/ do). ``--working-dir none`` ships nothing and runs the
ekipl installed on the cluster (the Docker images have it). The job connects to the cluster it runs on
(``trainer.ray_address=auto``).

Secrets are not sent: a job's runtime env is visible in the Ray dashboard. Set WANDB_API_KEY,
OPENAI_API_KEY, ... in the environment of ``ray start`` on the nodes; jobs inherit it. ``--env NAME``
forwards other variables (names that look like secrets are refused).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [
    ".git",
    ".venv",
    ".tools",
    "outputs",
    "multirun",
    "wandb",
    "**/__pycache__",
    "*.safetensors",
    "*.bin",
    "*.pt",
]
NO_AGENT = "No available agent to submit job"
SUBMITTED = re.compile(r"Job '.*' submitted successfully")
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


def build_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env_vars = {}
    for name in args.env:
        if SECRET_NAME.search(name):
            raise SystemExit(
                f"submit: refusing to put {name} in the job's runtime env (visible in the dashboard); "
                "set it in the environment of `ray start` instead"
            )
        if name not in os.environ:
            raise SystemExit(f"submit: --env {name}: not set in this environment")
        env_vars[name] = os.environ[name]
    runtime_env: dict = {}
    if str(args.working_dir) != "none":
        runtime_env = {"working_dir": args.working_dir, "excludes": EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    # Inside a job, Ray is already there: connect to it rather than start a local one.
    overrides = ["trainer.ray_address=auto", "trainer.ray_num_cpus=null", *overrides]
    entry = [args.python, "-m", args.module, *overrides]
    cmd = [ray, "job", "submit", "--address", args.address, "--runtime-env-json", json.dumps(runtime_env)]
    if args.submission_id:
        cmd += ["--submission-id", args.submission_id]
    if args.no_wait:
        cmd.append("--no-wait")
    return [*cmd, "--", *entry]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    else:
        overrides = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    p.add_argument("--module", default="ekipl.train", choices=["ekipl.train", "ekipl.sft"])
    p.add_argument("--python", default="python", help="the Python on the cluster's nodes")
    p.add_argument(
        "--working-dir",
        default=str(ROOT),
        help="the directory shipped to the job; 'none' when the cluster's image already has ekipl",
    )
    p.add_argument("--env", action="append", default=[], help="forward this (non-secret) variable")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("--dry-run", action="store_true", help="print the command only")
    p.add_argument(
        "--agent-wait-s", type=float, default=120.0, help="retry while the head's job agent starts"
    )
    args = p.parse_args(argv)
    out = [o.split("=", 1)[1] for o in overrides if o.startswith("trainer.output_dir=")]
    if not out or not os.path.isabs(out[-1]):
        print(
            "submit: warning: give an absolute trainer.output_dir on storage the head node keeps; a relative "
            "one lands in the job's temporary copy of the working dir",
            file=sys.stderr,
        )
    cmd = build_command(args, overrides)
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return submit_with_retries(cmd, env, args.agent_wait_s)


def submit_with_retries(cmd: list[str], env: dict, wait_s: float) -> int:
    """Run ``ray job submit``, echoing its output. A head that has just started may answer "No
    available agent to submit job" until its job agent registers: no job was created then, so the
    submission is retried for up to ``wait_s`` seconds. An attempt's output is held back until its
    job is submitted (then it streams as it comes), so that a refused attempt shows as one line, not
    as the CLI's traceback; the last attempt's output is shown whole."""
    deadline = time.monotonic() + wait_s
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        held: list[str] | None = []  # None once the job is submitted
        agent_missing = False
        for line in proc.stdout:
            agent_missing = agent_missing or NO_AGENT in line
            if held is None:
                sys.stdout.write(line)
                continue
            held.append(line)
            if SUBMITTED.search(line):
                sys.stdout.writelines(held)
                sys.stdout.flush()
                held = None
        rc = proc.wait()
        # never again once a job was created: only a refused submission is retried
        retry = rc != 0 and held is not None and agent_missing and time.monotonic() <= deadline
        if not retry:
            sys.stdout.writelines(held or [])
            sys.stdout.flush()
            return rc
        print(
            f"submit: the cluster's job agent is not up yet ({NO_AGENT!r}); retrying in 2 s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(2.0)


if __name__ == "__main__":
    sys.exit(main())
