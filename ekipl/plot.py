"""``ekipl plot RUN_DIR... [--out curves.png] [--smoothing 0.6]``: curves of one or several runs
from metrics.jsonl.

Per-step metrics are noisy (a few prompts per step), so each is drawn as faint raw points under a
smoothed line: the debiased exponential moving average W&B draws by default,
``s_t = a s_{t-1} + (1 - a) x_t``, shown as ``s_t / (1 - a^t)`` so the first steps are not pulled
toward 0 (``--smoothing`` a; 0 draws the raw values as lines). Held-out validation (``val/*``) is
sparse and already averaged over its split: drawn as it is, with markers.
"""

from __future__ import annotations

from pathlib import Path

from ekipl.metrics import read_metrics

# What to read first (README, "Reading a run"): reward and held-out accuracy, where the group's
# actions come from, lengths and truncation, and the update's health.
DEFAULT_KEYS = (
    "reward/policy/mean",
    "val/id/accuracy",
    "val/ood/accuracy",
    "select/ratio/policy",
    "select/aux_win_rate",
    "length/policy/mean",
    "length/policy/truncated_frac",
    "actor/entropy",
    "actor/grad_norm",
    "actor/clip_frac",
    "actor/aux_clip_frac",
    "timing/step",
)


def run_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return read_metrics(path)


def ema(values: list[float], smoothing: float) -> list[float]:
    """The debiased exponential moving average of ``values`` (W&B's default smoothing)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = smoothing * s + (1.0 - smoothing) * x
        out.append(s / (1.0 - smoothing**t))
    return out


def plot_runs(
    run_dirs: list[str | Path], out: str | Path, keys: tuple[str, ...] = DEFAULT_KEYS, smoothing: float = 0.6
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {str(d): run_metrics(d) for d in run_dirs}
    cols = 3
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        if not any(key in r for rows in runs.values() for r in rows):
            ax.text(0.5, 0.5, "not logged in these runs", ha="center", va="center", fontsize=8, alpha=0.6)
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            if key.startswith("val/") or not smoothing:
                ax.plot(
                    xs,
                    ys,
                    marker="o" if key.startswith("val/") else None,
                    markersize=3,
                    label=Path(name).name,
                )
                continue
            (line,) = ax.plot(xs, ema(list(ys), smoothing), label=Path(name).name)
            ax.scatter(xs, ys, s=6, color=line.get_color(), alpha=0.25, linewidths=0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
