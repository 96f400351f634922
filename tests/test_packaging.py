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


def _uv() -> str:
    uv = ROOT / ".tools" / "bin" / "uv"  # the Makefile's (make test installs it first)
    if not uv.is_file():
        pytest.skip("the Makefile's uv is not installed (run make install)")
    return str(uv)


def test_the_lock_is_current_and_its_gpu_extra_matches_the_images_cuda():
    """uv.lock still resolves pyproject.toml (no network: the lock is checked, not re-resolved), its
    GPU extra exports, and the GPU image's CUDA base has the CUDA major the lock's torch wheels need
    (a CUDA 12 base under CUDA 13 wheels needs a newer driver than the image says)."""
    import subprocess

    check = subprocess.run([_uv(), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    export = subprocess.run(
        [_uv(), "export", "--extra", "gpu", "--frozen", "--no-hashes", "--no-emit-project"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    assert re.search(r"^vllm==0\.32\.0\b", export.stdout, re.M) and re.search(
        r"^torch==2\.13\.0\b", export.stdout, re.M
    )
    runtime = re.search(
        r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)\S* ; platform_machine != 's390x'", export.stdout, re.M
    )
    assert runtime, "no CUDA runtime wheel in the GPU extra"
    base = re.search(
        r"^FROM nvidia/cuda:(\d+)\.(\d+)", (ROOT / "docker" / "Dockerfile.gpu").read_text(), re.M
    )
    assert base and base.groups() == runtime.groups(), (base and base.groups(), runtime.groups())
    assert (
        f"CUDA {runtime.group(1)}.{runtime.group(2)}" in (ROOT / "README.md").read_text()
    )  # the driver it needs


def test_make_install_asks_uv_for_python_311_or_says_which_it_needs():
    make = _makefile()
    assert "PYTHON_VERSION := 3.11" in make
    syncs = re.findall(r"\$\(UV\) sync ([^\n]+)", make)
    assert all("--python $(PYTHON_VERSION)" in s for s in syncs), syncs
    assert "ekipl needs Python $(PYTHON_VERSION)" in make and "exit 2" in make


def test_published_model_configs_ship_with_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"ekipl.models" = ["published/*.json"]' in text
    assert list((ROOT / "ekipl" / "models" / "published").glob("*.json"))
