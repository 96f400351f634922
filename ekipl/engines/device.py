"""The one GPU check of an actor that asked for GPUs: it uses CUDA, or the run stops at start-up.

Without it a node whose driver is too old for the lock's CUDA wheels would go on quietly: torch sees
no GPU, the learner falls back to gloo on the CPU and vLLM to its CPU path, hours slower.
"""

from __future__ import annotations

import os


class NoCudaError(RuntimeError):
    """An actor that asked for GPUs cannot use CUDA."""


def driver_cuda_version() -> str | None:
    """The CUDA version the node's NVIDIA driver supports (``cuDriverGetVersion``), or None when no
    driver library loads."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return f"{v.value // 1000}.{(v.value % 1000) // 10}"


def require_cuda(actor: str, gpus: float) -> None:
    """Raise :class:`NoCudaError`, saying what this process saw, when ``actor`` was given ``gpus`` > 0
    GPUs and torch cannot use CUDA here."""
    if not gpus:
        return
    import torch

    if torch.cuda.is_available():
        return
    wheels = torch.version.cuda
    raise NoCudaError(
        f"{actor} asked for {gpus:g} GPU(s) but cannot use CUDA: torch.cuda.is_available()=False, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, the driver's CUDA version "
        f"{driver_cuda_version() or 'unknown (no libcuda.so.1)'}, torch {torch.__version__} built for "
        f"CUDA {wheels or 'none (a CPU build)'}. Install a driver that supports CUDA {wheels or '13.0'} "
        "(README: GPU cluster), or run without GPUs (model.engine_num_gpus=0, learner.num_gpus_per_worker=0)"
    )
