"""Reason-RFT-CoT tasks: typed samples, loading, prompts, rewards and a synthetic generator."""

from .sample import TASKS, DataError, Sample

__all__ = ["TASKS", "DataError", "Sample"]
