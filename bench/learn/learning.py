"""`make learn`: the paper's comparison in miniature -- does the policy learn, and does EKIPL beat
GRPO? -- on 2 CPU cores, from the same CoT-SFT warm start, over several seeds.

Arms (``conf/experiment/learn_counting.yaml``, each a plain ``python -m ekipl.train`` run):

* ``grpo``:         ``algorithm=grpo aux=none`` (Reason-RFT's RL stage: the policy's own samples);
* ``grpo_ds``:      GRPO with dynamic sampling (DAPO): tied groups are refilled from further batches;
* ``ekipl``:        the paper: top-G from the policy's samples plus the stronger auxiliary model's and
  the recorded trace, plain PPO-clip;
* ``ekipl_gated``:  external actions only where every policy sample failed, replacing failed ones,
  the gated advantage rule (``algorithm=ekipl_gated``);
* ``ekipl_lora``:   EKIPL with LoRA (rank 8, the vision tower frozen), its lr from bench/learn/lora_pilot.py;
* ablations, where EKIPL's gain comes from: ``ekipl_aux_only`` (the auxiliary model alone, right
  only sometimes: the paper's setting), ``ekipl_traces_only`` (the always-right traces alone) and
  ``sft_traces`` (continued CoT-SFT on the traces, same prompts, steps and lr: no RL at all);
* ``ekipl_shaped``: the paper's groups with LUFFY's policy shaping on auxiliary tokens (not run by
  default any more: its result is in LEARNING.md).

`make learn` runs ``DEFAULT_ARMS``: GRPO, EKIPL and the three ablations, the arms that say whether
EKIPL beats GRPO and why. `make learn-more` (``--more``) adds ``MORE_ARMS``, and
``MORE_FAMILY_ARMS`` on the other families (bench/learn/families.py).

A finished run (its ``done.json``) is kept, not redone: rerunning the command resumes the batch.
The warm start's step-0 validation is measured once, by the batch's first GRPO run; the other runs
take its row and completions (:func:`run_arm`'s ``step0``): every run of a batch measured the same.

Every arm gets the same steps, prompts per step and policy samples per prompt; the seed changes the
sampling order and the samples, never the data (one synthetic set, data seed 0, the warm start's).
Held-out greedy accuracy (ID and OOD splits, ``ekipl.eval``'s scoring) is validated in the loop
every few steps. Nothing is tuned on the test splits: the settings were fixed before the runs.

Writes each run under ``--out`` (``<arm>/seed<k>/``: metrics.jsonl, val/ completions, samples.jsonl,
and the final policy in ``policy/``), the tables into ``bench/LEARNING.md`` (between its markers;
the analysis around them is written by hand) and the curves to ``bench/learning.png``.

    .venv/bin/python -m bench.learn.learning [--seeds 0 1 2] [--arms grpo ekipl ekipl_shaped] [--more] \
        [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # bench/: LEARNING.md, the pictures, results/


def lora_lr() -> str:
    """EKIPL with LoRA's learning rate: the one bench/learn/lora_pilot.py picked on the train split's
    reward (bench/results/lora_pilot.json, committed); never chosen on a test split."""
    pilot = HERE / "results" / "lora_pilot.json"
    if not pilot.is_file():
        raise SystemExit(
            f"{pilot} is missing: run `python -m bench.learn.lora_pilot` before the ekipl_lora arm"
        )
    return str(json.loads(pilot.read_text())["picked_lr"])


LORA = ["learner.lora.rank=8", "learner.lora.alpha=16"]


ARMS = {
    "grpo": ["algorithm=grpo", "aux=none"],
    "grpo_ds": ["algorithm=grpo", "aux=none", "rollout.dynamic_sampling=true"],
    "ekipl": [],
    "ekipl_gated": ["algorithm=ekipl_gated"],
    "ekipl_shaped": ["algorithm=ekipl_shaped"],
    # ablations: where EKIPL's gain comes from
    "ekipl_aux_only": ["~aux.dataset"],  # external actions that are sometimes wrong, no traces
    "ekipl_traces_only": ["~aux.aux_model"],  # the recorded (always right) traces only
    "sft_traces": [],  # continued CoT-SFT on the traces: same steps, prompts and lr (run_sft)
    # LoRA rank 8 on the language model's projections, the vision tower frozen
    "ekipl_lora": LORA,  # + learner.lr=lora_lr() (arm_overrides)
}
ABLATIONS = ["ekipl_aux_only", "ekipl_traces_only", "sft_traces"]
# `make learn`: the paper's comparison and the ablations that say where EKIPL's gain comes from
DEFAULT_ARMS = ["grpo", "ekipl", *ABLATIONS]
# `make learn-more`: the arms beyond the paper (dynamic sampling, guidance where the policy fails, LoRA)
MORE_ARMS = ["grpo_ds", "ekipl_gated", "ekipl_lora"]
# ... and on geometry and TRANCE (bench/learn/families.py)
MORE_FAMILY_ARMS = ["ekipl_gated"]
BEGIN, END = "<!-- learning:begin (bench/learn/learning.py writes this part) -->", "<!-- learning:end -->"


def finished(run_dir: Path, steps: int) -> float | None:
    """The wall time of a run that finished all ``steps`` (its done.json), else None."""
    done = run_dir / "done.json"
    if not done.is_file():
        return None
    info = json.loads(done.read_text())
    return float(info["seconds"]) if info.get("steps") == steps else None


def step0_row(run_dir: Path | None, steps: int, extra: list[str]) -> dict | None:
    """A finished run's step-0 validation row: the warm start's held-out scores, which every run of
    a batch (one warm start, one data seed, greedy) measures alike. None where that run finished
    other steps or ran with other overrides than ``extra`` (another batch in the same folder)."""
    if run_dir is None or finished(run_dir, steps) is None:
        return None
    cmd = json.loads((run_dir / "done.json").read_text()).get("cmd", [])
    if cmd[len(cmd) - len(extra) :] != extra:
        return None
    rows = [r for r in load_rows(run_dir) if r["step"] == 0 and "val/id/accuracy" in r]
    return rows[0] if rows else None


def share_step0(run_dir: Path, source: Path, row: dict) -> None:
    """``source``'s step-0 validation as ``run_dir``'s own: its row first in metrics.jsonl (as the
    trainer writes it) and its completions under val/."""
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps(row) + "\n" + metrics.read_text())
    for f in sorted((source / "val").glob("step_000000.*")):
        shutil.copy2(f, run_dir / "val" / f.name)


def run_arm(
    arm: str,
    seed: int,
    out: Path,
    steps: int,
    extra: list[str],
    overrides=None,
    experiment="learn_counting",
    step0: Path | None = None,
) -> float:
    """One training run as a user runs it; returns its wall time in seconds. A run that already
    finished with the same steps is kept (its recorded time is returned); a partial one is redone.
    ``overrides`` replace the arm's own (bench/learn/lora_pilot.py's candidates); ``experiment`` is the
    family's preset (bench/learn/families.py). ``step0``: a finished run of the same batch whose step-0
    validation (the warm start's) this run takes instead of measuring it again (``ekipl.train``
    with ``trainer.eval_before_train=false``; the rest of the run is unchanged, bench/LEARNING.md)."""
    run_dir = out / arm / f"seed{seed}"
    kept = finished(run_dir, steps)
    if kept is not None:
        print(f"[learn] {arm} seed {seed}: finished earlier, kept", flush=True)
        return kept
    if run_dir.exists():
        shutil.rmtree(run_dir)
    common = [f"trainer.seed={seed}", f"trainer.steps={steps}", f"trainer.output_dir={run_dir}"]
    shared = None if arm == "sft_traces" else step0_row(step0, steps, extra)
    t0 = time.perf_counter()
    if arm == "sft_traces":
        cmds = sft_commands(run_dir, common, extra)
    else:
        cmds = [
            [
                sys.executable, "-m", "ekipl.train", f"+experiment={experiment}",
                *(arm_overrides(arm) if overrides is None else overrides), *common,
                "trainer.log_samples_every=5", "logger.mode=offline", *extra,
                *(["trainer.eval_before_train=false"] if shared else []),
            ]
        ]  # fmt: skip
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if run_dir.is_dir():
            with open(run_dir / "console.log", "a") as f:
                f.write(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"{arm} seed {seed} failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    took = time.perf_counter() - t0
    if arm == "sft_traces":
        sft_metrics(run_dir, steps)
    done = {"steps": steps, "seconds": took, "cmd": cmds[0]}
    if shared:
        share_step0(run_dir, step0, shared)
        done["step0_from"] = str(step0)
    (run_dir / "done.json").write_text(json.dumps(done))
    return took


def arm_overrides(arm: str) -> list[str]:
    return [*ARMS[arm], f"learner.lr={lora_lr()}"] if arm == "ekipl_lora" else ARMS[arm]


def sft_commands(run_dir: Path, common: list[str], extra: list[str]) -> list[list[str]]:
    """The continued-SFT control: ``ekipl.sft`` from the RL arms' warm start on the same prompts
    (same sampler, seed and steps) with the RL arms' learning rate, then ``ekipl.eval`` (greedy, the
    validation's scoring and token budget) on the warm start and the result, on the same splits."""
    from ekipl.modelref import resolve_model

    sft_extra = [x for x in extra if not x.startswith("trainer.eval_every=")]
    data = run_dir / "data" / "counting"
    warm = resolve_model("learn-qwen2-vl-sft", model_seed_of(extra))  # the run's own model.seed
    return [
        [sys.executable, "-m", "ekipl.sft", "+experiment=learn_counting", *common, "logger.mode=offline",
         *sft_extra],
        [sys.executable, "-m", "ekipl.eval", "--model", f"warm={warm}",
         "--model", f"sft={run_dir / 'policy'}", "--split", f"id={data / 'test_id.json'}",
         "--split", f"ood={data / 'test_ood.json'}", "--k", "1", "--max-tokens", "128",
         "--out", str(run_dir / "eval")],
    ]  # fmt: skip


def sft_metrics(run_dir: Path, steps: int) -> None:
    """The SFT run's validation rows in the RL runs' metrics keys (step 0: the warm start), appended
    to its metrics.jsonl so the tables read every arm alike."""
    rows = json.loads((run_dir / "eval" / "eval.json").read_text())
    lines = []
    for model, step in (("warm", 0), ("sft", steps)):
        row = {"step": step}
        for r in (r for r in rows if r["model"] == model):
            row |= {f"val/{r['split']}/{k}": r[k] for k in ("accuracy", "format", "problems")}
        lines.append(json.dumps(row) + "\n")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.writelines(lines)


def load_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f}"


def steps_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first validated step whose accuracy reaches ``target`` (None: never)."""
    return next((s for s, v in points if s > 0 and v >= target - 1e-9), None)


def summarize(runs: dict[str, dict[int, list[dict]]], times: dict[str, list[float]]) -> list[dict]:
    """One row per arm: final accuracies, steps to GRPO's final ID accuracy, format, sources."""
    grpo_final = statistics.mean(curve(rows, "val/id/accuracy")[-1][1] for rows in runs["grpo"].values())
    out = []
    for arm, seeds in runs.items():
        rows_by_seed = list(seeds.values())

        def final(key, rows_by_seed=rows_by_seed):
            return [curve(rows, key)[-1][1] for rows in rows_by_seed if curve(rows, key)]

        def step_mean(key, rows_by_seed=rows_by_seed, part=slice(None)):
            vals = [
                statistics.mean(v for _, v in curve(rows, key)[part])
                for rows in rows_by_seed
                if curve(rows, key)
            ]
            return vals

        reach = [steps_to_reach(curve(rows, "val/id/accuracy"), grpo_final) for rows in rows_by_seed]
        sources = sorted(
            {
                k.split("/")[-1]
                for rows in rows_by_seed
                for r in rows
                for k in r
                if k.startswith("select/ratio/")
            }
        )
        out.append(
            {
                "arm": arm,
                "seeds": len(rows_by_seed),
                "start_id": final_first(rows_by_seed, "val/id/accuracy"),
                "final_id": final("val/id/accuracy"),
                "final_ood": final("val/ood/accuracy"),
                "final_format": final("val/id/format"),
                "train_reward_first5": step_mean("reward/policy/mean", part=slice(0, 5)),
                "train_reward_last5": step_mean("reward/policy/mean", part=slice(-5, None)),
                "reach": reach,
                "grpo_final": grpo_final,
                "aux_win_rate": step_mean("select/aux_win_rate"),
                "ratio_first5": {s: step_mean(f"select/ratio/{s}", part=slice(0, 5)) for s in sources},
                "ratio_last5": {s: step_mean(f"select/ratio/{s}", part=slice(-5, None)) for s in sources},
                "aux_accuracy": {s: step_mean(f"reward/{s}/accuracy") for s in sources if s != "policy"},
                "minutes": [t / 60 for t in times[arm]],
                "aux_requests": [last(rows, "aux/requests_total", 0.0) for rows in rows_by_seed],
                "aux_tokens": [last(rows, "aux/tokens_total", 0.0) for rows in rows_by_seed],
                "sample_rounds": step_mean("rollout/sample_rounds"),
                "groups_kept": step_mean("rollout/groups_kept"),
            }
        )
    return out


def last(rows: list[dict], key: str, default: float) -> float:
    """The last logged value of a cumulative counter (``default`` when never logged)."""
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else default


def cost_table(summary: list[dict]) -> list[str]:
    """What guidance costs: auxiliary requests per run (completions asked of every source, cache
    hits free), relative to the paper's recipe (the ``ekipl`` arm), and the held-out ID accuracy
    gained over the warm start per 1,000 of them."""
    paper = next((s for s in summary if s["arm"] == "ekipl"), None)
    base = statistics.mean(paper["aux_requests"]) if paper and paper["aux_requests"] else 0.0
    lines = [
        "",
        "What guidance costs, per run: auxiliary requests (completions asked of the sources, the traces "
        "included; prefetched or on demand), relative to the paper's recipe (`ekipl`), the held-out ID "
        "accuracy gained over the warm start per 1,000 requests, and the batches rolled out per step "
        "(dynamic sampling draws more when groups tie):",
        "",
        "| arm | aux requests per run | vs ekipl | aux tokens per run | ID gain per 1,000 requests | "
        "batches per step | groups trained per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        req = s["aux_requests"]
        gains = [
            (f - w) / (r / 1000) for f, w, r in zip(s["final_id"], s["start_id"], req, strict=False) if r > 0
        ]
        rel = f"{statistics.mean(req) / base:.2f}x" if base and req else "-"
        lines.append(
            f"| {s['arm']} | {mean_std(req)} | {rel} | {mean_std(s['aux_tokens'])} | "
            f"{mean_std(gains) if gains else '-'} | {mean_std(s['sample_rounds'])} | "
            f"{mean_std(s['groups_kept'])} |"
        )
    return lines


def final_first(rows_by_seed, key):
    return [curve(rows, key)[0][1] for rows in rows_by_seed if curve(rows, key)]


def tables(summary: list[dict], steps: int, eval_every: int, problems: int) -> str:
    reach_txt = []
    for s in summary:
        got = [r for r in s["reach"] if r is not None]
        reach_txt.append(
            f"{statistics.mean(got):.1f} ({len(got)}/{s['seeds']} seeds)"
            if got
            else f"never (0/{s['seeds']})"
        )
    lines = [
        f"{steps} steps per run, validation every {eval_every} steps on {problems} held-out problems per "
        "split (greedy, `ekipl.eval`'s scoring); mean ± std over seeds.",
        "",
        "| arm | seeds | ID acc. at step 0 | final ID acc. | final OOD acc. | steps to GRPO's final ID "
        f"({summary[0]['grpo_final']:.3f}) | final format (ID) | train reward, first 5 → last 5 steps | "
        "minutes per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s, reach in zip(summary, reach_txt, strict=True):
        lines.append(
            f"| {s['arm']} | {s['seeds']} | {mean_std(s['start_id'])} | {mean_std(s['final_id'])} | "
            f"{mean_std(s['final_ood'])} | {reach} | {mean_std(s['final_format'])} | "
            f"{mean_std(s['train_reward_first5'])} → {mean_std(s['train_reward_last5'])} | "
            f"{mean_std(s['minutes'])} |"
        )
    lines += [
        "",
        "Where the selected actions came from (`select/ratio/<source>`, first 5 → last 5 steps), how "
        "often an auxiliary action was the group's best (`select/aux_win_rate`), and each auxiliary source's "
        "training accuracy (`reward/<source>/accuracy`):",
        "",
        "| arm | aux win rate | action-source ratio, first 5 → last 5 steps | aux accuracy |",
        "|---|---|---|---|",
    ]
    for s in summary:
        ratio = "; ".join(
            f"{src} {mean_std(s['ratio_first5'][src])} → {mean_std(s['ratio_last5'][src])}"
            for src in s["ratio_first5"]
        )
        acc = "; ".join(f"{src} {mean_std(v)}" for src, v in s["aux_accuracy"].items()) or "-"
        lines.append(f"| {s['arm']} | {mean_std(s['aux_win_rate'])} | {ratio} | {acc} |")
    lines += cost_table(summary)
    return "\n".join(lines)


def write_markdown(text: str, path: Path, begin: str = BEGIN, end: str = END) -> None:
    """Replace the part between the markers; the hand-written analysis around it stays."""
    old = path.read_text() if path.is_file() else f"# Learning\n\n{begin}\n{end}\n"
    if begin not in old:
        old += f"\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def plot(families: dict[str, dict[str, dict[int, list[dict]]]], path: Path) -> None:
    """The curves, one row of panels per task family ({family: {arm: {seed: rows}}}), mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("val/id/accuracy", "held-out ID accuracy (greedy)"),
        ("val/ood/accuracy", "held-out OOD accuracy (greedy)"),
        ("reward/policy/mean", "policy reward (train, accuracy + format)"),
        ("select/ratio/policy", "share of policy actions in the groups"),
    ]
    fig, axes = plt.subplots(
        len(families), len(keys), figsize=(4.2 * len(keys), 3.4 * len(families)), squeeze=False
    )
    for row, (family, runs) in zip(axes, families.items(), strict=True):
        for ax, (key, title) in zip(row, keys, strict=True):
            for arm, seeds in runs.items():
                plot_arm(ax, arm, [curve(rows, key) for rows in seeds.values()], key.startswith("val/"))
            ax.set_title(f"{family}: {title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    seeds = sorted({len(s) for runs in families.values() for s in runs.values()})
    fig.suptitle(f"mean ± std over {'/'.join(map(str, seeds))} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_arm(ax, arm: str, curves: list[list[tuple[int, float]]], markers: bool) -> None:
    """One arm's mean curve over its seeds, with a ± std band."""
    curves = [c for c in curves if c]
    if not curves:
        return
    n = min(len(c) for c in curves)
    xs = [p[0] for p in curves[0][:n]]
    ys = [[c[i][1] for c in curves] for i in range(n)]
    mu = [statistics.mean(y) for y in ys]
    sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
    (line,) = ax.plot(xs, mu, marker="o" if markers else None, ms=3, label=arm)
    lo, hi = [m - s for m, s in zip(mu, sd, strict=True)], [m + s for m, s in zip(mu, sd, strict=True)]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)


def model_seed_of(extra: list[str]) -> int:
    """The ``model.seed`` the runs' overrides set (0, the presets' default, when they set none): the
    warm starts are prebuilt for the seed the runs will resolve them with."""
    return next((int(x.split("=", 1)[1]) for x in extra if x.startswith("model.seed=")), 0)


def with_more(arms: list[str], more: list[str]) -> list[str]:
    """``arms`` and then those of ``more`` not among them (``--more``: `make learn-more`)."""
    return [*arms, *(a for a in more if a not in arms)]


def batch_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every `make learn` batch takes (bench/learn/families.py's too)."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", default="outputs/learning")
    ap.add_argument("--md", default=str(HERE / "LEARNING.md"))
    ap.add_argument("--png", default=str(HERE / "learning.png"))
    ap.add_argument("--report-only", action="store_true", help="tables and curves from existing runs")
    ap.add_argument("--more", action="store_true", help="the arms beyond the paper too (make learn-more)")
    ap.add_argument("extra", nargs="*", help="Hydra overrides for every run")
    return ap


def main(argv=None) -> int:
    ap = batch_args(argparse.ArgumentParser())
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    args = ap.parse_args(argv)
    args.arms = with_more(args.arms, MORE_ARMS) if args.more else args.arms
    out = Path(args.out)
    if "grpo" not in args.arms:
        ap.error("the tables compare with GRPO: keep the grpo arm")
    extra = [f"trainer.eval_every={args.eval_every}", *args.extra]

    t_all = time.perf_counter()
    times: dict[str, list[float]] = {arm: [] for arm in args.arms}
    if not args.report_only:
        from ekipl.modelref import resolve_model

        t0 = time.perf_counter()  # the warm starts: built once, cached by recipe and model seed
        model_seed = model_seed_of(args.extra)
        for name in ("learn-qwen2-vl-sft", "learn-qwen2-vl-aux"):
            print(
                f"[learn] warm start {name} (seed {model_seed}): {resolve_model(name, model_seed)}",
                flush=True,
            )
        print(f"[learn] warm starts ready in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        first = out / "grpo" / f"seed{args.seeds[0]}"  # whose step-0 validation the others take
        for seed in args.seeds:  # seed-major: a partial run still compares every arm
            for arm in args.arms:
                took = run_arm(arm, seed, out, args.steps, extra, step0=first)
                times[arm].append(took)
                rows = load_rows(out / arm / f"seed{seed}")
                acc = curve(rows, "val/id/accuracy")
                print(
                    f"[learn] {arm} seed {seed}: {took / 60:.1f} min, val ID accuracy "
                    + " ".join(f"{s}:{v:.2f}" for s, v in acc)
                    + f" (elapsed {(time.perf_counter() - t_all) / 60:.1f} min)",
                    flush=True,
                )
        (out / "times.json").write_text(json.dumps(times))
    else:
        times = {
            arm: [finished(out / arm / f"seed{s}", args.steps) or 0.0 for s in args.seeds]
            for arm in args.arms
        }
    runs = {arm: {seed: load_rows(out / arm / f"seed{seed}") for seed in args.seeds} for arm in args.arms}
    summary = summarize(runs, times)
    problems = int(curve(runs["grpo"][args.seeds[0]], "val/id/problems")[0][1])
    text = tables(summary, args.steps, args.eval_every, problems)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_markdown(text, Path(args.md))
    plot({"counting": runs}, Path(args.png))
    print(text)
    print(f"\n[learn] {args.md}, {args.png}; runs under {out} (final policies in <arm>/seed<k>/policy)")
    print(f"[learn] done in {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
