"""Helpers for tests that compose configs and read what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from ekipl.cluster import compose  # noqa: F401 -- the tests' name for it: the config ekipl.train would run

CONF = Path(__file__).resolve().parent.parent / "conf"


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# A small, fast live run: the CPU demo without its second VLM (the policy engine, recorded traces as
# the auxiliary source, 2 ZeRO ranks on gloo), W&B off.
SMALL = ["+experiment=cpu_demo", "aux.aux_b=null", "data.synthetic_size=8", "logger.mode=disabled"]
