"""The Docker images install exactly what `make install` does (no daemon here to build them:
these checks keep the files from drifting away from the Makefile and the lock)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


def _uv_version() -> str:
    return re.search(r"^UV_VERSION := (\S+)$", _makefile(), re.M).group(1)


@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_dockerfile_installs_from_the_lock_with_the_makefiles_uv(extra):
    text = (ROOT / "docker" / f"Dockerfile.{extra}").read_text()
    assert f"uv=={_uv_version()}" in text, "the image's uv differs from the Makefile's"
    assert "COPY pyproject.toml uv.lock" in text
    syncs = re.findall(r"uv sync ([^\n&]+)", text)
    assert syncs and all("--frozen" in s and f"--extra {extra}" in s for s in syncs), syncs
    # the dependencies' .pyc files are written once at install, as `make install` does (the Makefile)
    assert "--compile-bytecode" in syncs[0]
    make_syncs = re.findall(r"\$\(UV\) sync ([^\n]+)", _makefile())
    assert len(make_syncs) == 2 and all("--compile-bytecode" in s for s in make_syncs), make_syncs
    assert "3.11" in text  # requires-python = "==3.11.*"
    assert not re.search(r"(API_KEY|TOKEN)\s*=", text), "no secret baked into an image"


def test_python_pin_matches_pyproject():
    assert 'requires-python = "==3.11.*"' in (ROOT / "pyproject.toml").read_text()
