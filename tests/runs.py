"""Helpers for tests that compose configs and read what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides):
    """The Hydra config that ``python -m ekipl.train OVERRIDES...`` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ekipl.config import register

    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose(config_name="config", overrides=list(overrides))


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# A small, fast live run: the CPU demo without its second VLM (the policy engine, recorded traces as
# the auxiliary source, 2 ZeRO ranks on gloo), W&B off.
SMALL = ["+experiment=cpu_demo", "aux.aux_b=null", "data.synthetic_size=8", "logger.mode=disabled"]
