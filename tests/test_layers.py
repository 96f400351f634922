"""The layering of ``ekipl/``, kept by a test: every import (at any depth in a module, deferred ones
included) points down or sideways, never up, and no package reaches into another's private names.

    0  tasks, algo, engines, models, types       what everything else is made of
    1  rollout, learner                          side by side, each on layer 0 only
    2  config, modelref, data, cluster,          a run's configuration and the services around
       placement, checkpoint, metrics, warm      its loop (models, data, Hydra and Ray)
    3  train, sft, eval, validation, plan,       the entry points and what only they use
       demo, cli, plot
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ekipl"

LAYERS = {
    **dict.fromkeys(("tasks", "algo", "engines", "models", "types"), 0),
    **dict.fromkeys(("rollout", "learner"), 1),
    **dict.fromkeys(
        ("config", "modelref", "data", "cluster", "placement", "checkpoint", "metrics", "warm"), 2
    ),
    **dict.fromkeys(("train", "sft", "eval", "validation", "plan", "demo", "cli", "plot"), 3),
}


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every ekipl import in ``path``."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name == "ekipl" or name.startswith("ekipl."):
                out.append((name, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("ekipl")]
    return out


def _part(module: str) -> str | None:
    """The layer key of ``ekipl.X...`` (X), or None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        src = _module(path)
        src_part = _part(src)
        if src_part is None:
            continue
        assert src_part in LAYERS, f"{src}: give ekipl.{src_part} a layer in tests/test_layers.py"
        for target, names, line in _imports(path):
            part = _part(target)
            if part is None:  # `from ekipl import X`: X is the part
                for n in names:
                    if n in LAYERS and LAYERS[n] > LAYERS[src_part]:
                        bad.append(
                            f"{src}:{line} imports ekipl.{n} (layer {LAYERS[n]} above {LAYERS[src_part]})"
                        )
                continue
            if LAYERS[part] > LAYERS[src_part]:
                bad.append(f"{src}:{line} imports {target} (layer {LAYERS[part]} above {LAYERS[src_part]})")
            elif LAYERS[part] == LAYERS[src_part] == 1 and part != src_part:
                bad.append(f"{src}:{line} imports {target}: rollout and learner stand side by side")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and part != src_part:
                bad.append(f"{src}:{line} takes private {private} from {target}")
    return bad


def test_every_import_points_down_and_no_private_name_crosses_a_package():
    assert _violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a layer-0 module importing the trainer is reported."""
    import shutil

    fake = tmp_path / "ekipl"
    shutil.copytree(PKG, fake, ignore=shutil.ignore_patterns("__pycache__", "published"))
    (fake / "tasks" / "bad.py").write_text(
        "from ekipl.train import Trainer\nfrom ekipl.tasks.synth import _x\n"
    )
    (fake / "models" / "worse.py").write_text("def f():\n    from ekipl.tasks.synth import _rng\n")
    (fake / "learner" / "side.py").write_text("from ekipl.rollout.policy import PolicyRouter\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    got = _violations()
    assert any("ekipl.tasks.bad:1 imports ekipl.train" in v for v in got), got
    assert any("ekipl.models.worse:2 takes private ['_rng']" in v for v in got), got
    assert any("ekipl.learner.side:1 imports ekipl.rollout.policy: rollout and learner" in v for v in got), (
        got
    )
    assert not any("tasks.bad" in v and "private" in v for v in got)  # same package: allowed
