"""Where a run's numbers go: ``metrics.jsonl`` always, W&B when enabled (offline without a key).

Online W&B that does not answer within ``logger.init_timeout_s`` (a compute node without a route to
it) is not fatal: the run logs offline with a warning that says how to ``wandb sync`` it later.

Secrets never leave through here: the logged config goes through :func:`redact`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Config keys whose values are secrets: "api_key", "wandb_token", "secret", "password"... but not
# "max_tokens" or "api_key_env" (which holds a variable's name, not its value).
SECRET_KEY = re.compile(r"(^|_)(key|token|secret|password)$", re.IGNORECASE)


def redact(obj):
    """A copy of a config tree with values under secret-looking keys replaced (names stay)."""
    if isinstance(obj, dict):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def read_metrics(path: Path, skip_bad_lines: bool = False) -> list[dict]:
    """The rows of a metrics.jsonl. A line that is not JSON raises ValueError naming it, or with
    ``skip_bad_lines`` (a resumed run: a crash may have torn a line mid-write) is left out."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not skip_bad_lines:
                raise ValueError(f"{path}: line {n} is not JSON: {e.msg}") from None
    return rows


def _keep_until(path: Path, resume_step: int) -> None:
    """Rewrite a per-step JSONL file with only its rows up to ``resume_step`` (those steps are not
    run again); empty for a fresh run (``resume_step`` 0)."""
    kept = []
    if resume_step and path.is_file():
        kept = [r for r in read_metrics(path, skip_bad_lines=True) if r.get("step", 0) <= resume_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """Appends one JSON row per step; on resume, rows after the checkpoint's step are dropped
    (those steps are run again). ``logger`` is a :class:`~ekipl.config.LoggerConfig`."""

    def __init__(
        self, logger, out: Path, config_tree: dict, resume_step: int = 0, wandb_id: str | None = None
    ):
        self.path = Path(out) / "metrics.jsonl"
        _keep_until(self.path, resume_step)
        if self.path.with_name("samples.jsonl").is_file():  # the logged samples likewise
            _keep_until(self.path.with_name("samples.jsonl"), resume_step)
        self.wandb = None
        self.fell_back = False  # online W&B was unreachable and the run logs offline
        if logger.wandb and logger.mode != "disabled":
            import wandb

            mode = logger.mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            os.environ.setdefault("WANDB_SILENT", "true")
            kwargs = dict(
                project=logger.project,
                name=logger.run_name,
                dir=str(out),
                config=redact(config_tree),
                id=wandb_id,
                resume="allow" if wandb_id else None,
                reinit="finish_previous",
            )
            try:
                settings = wandb.Settings(init_timeout=logger.init_timeout_s)
                self.wandb = wandb.init(mode=mode, settings=settings, **kwargs)
            except wandb.errors.CommError as e:  # no route to W&B (compute nodes often have none)
                if mode != "online":
                    raise
                log.warning(
                    "W&B is unreachable (%s; logger.init_timeout_s=%gs): logging offline under %s instead. "
                    "Sync the run later from a machine with a route: wandb sync %s/wandb/offline-run-*",
                    (str(e).splitlines() or [""])[0][:200],
                    logger.init_timeout_s,
                    out,
                    out,
                )
                self.wandb = wandb.init(mode="offline", **kwargs)
                self.fell_back = True

    @property
    def run_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and math.isfinite(v)}, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """A few groups' candidates (see ``ekipl.train.sample_rows``): appended to ``samples.jsonl``
        and logged to W&B as a table named ``samples``."""
        if not rows:
            return
        with open(self.path.with_name("samples.jsonl"), "a") as f:
            f.write("".join(json.dumps({"step": step, **r}) + "\n" for r in rows))
        if self.wandb is not None:
            import wandb

            cols = ["step", *rows[0]]
            table = wandb.Table(columns=cols, data=[[step, *r.values()] for r in rows])
            self.wandb.log({"samples": table}, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
