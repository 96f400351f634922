"""Starting a run: Hydra's composition of ``conf/`` and the command-line entry of ``ekipl.train``
and ``ekipl.sft`` (bad config or data exits 2, a run that had to stop exits 1), and Ray, local or
joined."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ekipl.config import ConfigError, RunConfig
from ekipl.tasks.sample import DataError


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. K consecutive non-finite steps); the last checkpoint is intact."""


def compose(overrides) -> object:
    """The Hydra config that ``python -m ekipl.train OVERRIDES...`` would run (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ekipl.config import register

    register()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir):
        return hydra_compose(config_name="config", overrides=list(overrides))


def config_tree(cfg) -> dict:
    """A Hydra DictConfig (or a plain dict) as a resolved plain dict."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def init_ray(run: RunConfig) -> bool:
    """Join ``trainer.ray_address`` or start a local Ray, unless Ray is already up (tests, jobs).
    Returns whether this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(
        address=run.trainer.ray_address,
        num_cpus=run.trainer.ray_num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def hydra_main(run_fn) -> None:
    """The command-line entry of ``ekipl.train`` and ``ekipl.sft``: Hydra composes ``conf/``, then
    ``run_fn(cfg)``. Bad config or data exits 2 with the message; a run that had to stop exits 1."""
    import hydra

    from ekipl.config import register

    register()
    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="config")
    def _main(cfg) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            summary = run_fn(cfg)
        except (ConfigError, DataError) as e:
            print(f"ekipl: error: {e}", file=sys.stderr)
            sys.exit(2)
        except TrainingError as e:
            print(f"ekipl: run stopped: {e}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))

    _main()
