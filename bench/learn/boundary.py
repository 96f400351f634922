"""The reasoning boundary (the paper's claim 2) and the final scores, per task family.

- pass@k for k = 1, 2, 4, 8, 16 on the held-out ID and OOD splits the runs validated on (128
  problems each), for the warm start and every arm's final policies of ``make learn``, with
  ``ekipl.eval``'s unbiased estimator (n = 16 samples per problem at temperature 1, the rollout's
  token budget);
- greedy accuracy on test splits of ``--final-problems`` (1,000) problems each, as Reason-RFT's own
  test sets have, generated from the runs' data seed (the in-loop split is their first 128 rows).

GRPO is known to narrow pass@k at large k (Yue et al., 2504.13837) while methods that add external
traces report widening it (RL-PLUS, AMPO): the curve per arm says which happens here. Each arm's
seeds are evaluated in one ``ekipl.eval`` (one engine, weights loaded in turn; the large splits as
its ``--greedy-split``) and kept under ``--out`` (``<family>/<arm>.json`` and
``final-<arm>.json``; counting's at the top, as before): a rerun skips what is done, and an
arm whose evaluations are kept is reported without its policies (bench/results/ keeps the JSON,
not the policies; each family's warm start follows its runs' own ``model.seed``). Writes the
tables into bench/LEARNING.md (between its own markers) and the curves to bench/boundary.png, one
row per family. A one-model row (the warm start) carries its standard error over the problems
where an arm's carries the std over its seeds. Last comes the issue's bar (:func:`bar_table`): the
paper's three claims, EKIPL against GRPO, per family and averaged over the families, with a verdict.

    .venv/bin/python -m bench.learn.boundary [--families counting geometry trance] [--arms ...] \
        [--seeds 0 1 2] [--family-arms grpo ekipl ekipl_gated] [--more] [--runs DIR] \
        [--counting-runs DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from bench.learn.learning import (
    DEFAULT_ARMS,
    HERE,
    MORE_ARMS,
    MORE_FAMILY_ARMS,
    mean_std,
    model_seed_of,
    with_more,
)

KS = [1, 2, 4, 8, 16]
BEGIN, END = "<!-- boundary:begin (bench/learn/boundary.py writes this part) -->", "<!-- boundary:end -->"


# The evaluation engine's sequences in flight: 256 was 18-23% faster than the engine's default 64 on
# 2 cores (2026-12-07). On CPU the samples, so pass@k, are another draw with it; greedy is not.
EVAL_SEQS = 256


def evaluate_arm(
    arm: str,
    models: dict[str, str],
    data: Path | None,
    large: Path | None,
    out: Path,
    max_tokens: int,
    seqs: int = EVAL_SEQS,
) -> tuple[list[dict], list[dict]]:
    """The arm's pass@k rows on the validated splits under ``data`` and its greedy rows on the large
    test splits under ``large`` (None: no finals), from one ``ekipl.eval`` (one engine for all its
    models), kept in ``out/<arm>.json`` and ``out/final-<arm>.json``: a kept file is not measured
    again."""
    files = kept_files(out, arm)
    want = {"pass": data, "final": large}
    todo = {part for part in files if want[part] is not None and not files[part].is_file()}
    for part in set(want) - todo:
        if files[part].is_file():
            print(f"[boundary] {out.name}/{files[part].name}: evaluated earlier, kept", flush=True)
    if todo:
        cmd = [sys.executable, "-m", "ekipl.eval"]
        for name, path in models.items():
            cmd += ["--model", f"{name}={path}"]
        for split in ("id", "ood"):
            if "pass" in todo:
                cmd += ["--split", f"{split}={data / f'test_{split}.json'}"]
            if "final" in todo:
                cmd += ["--greedy-split", f"final_{split}={large / f'test_{split}.json'}"]
        cmd += [
            "--k", *map(str, KS), "--max-tokens", str(max_tokens), "--out", str(out / arm),
            "--dtype", "float32",  # as the in-loop validation (the runs' model.dtype)
            "--max-num-seqs", str(seqs),
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{arm}: {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        parts = by_part(json.loads((out / arm / "eval.json").read_text()))
        out.mkdir(parents=True, exist_ok=True)
        for part in todo:
            files[part].write_text(json.dumps(parts[part], indent=1))
    return tuple(json.loads(f.read_text()) if f.is_file() else [] for f in files.values())


def by_part(rows: list[dict]) -> dict[str, list[dict]]:
    """One ``ekipl.eval``'s rows as the two kept files': the pass@k splits' and the greedy
    ``final_<split>`` ones, whose split is named as before (id, ood)."""
    parts = {"pass": [], "final": []}
    for r in rows:
        final = r["split"].startswith("final_")
        parts["final" if final else "pass"].append(r | {"split": r["split"].removeprefix("final_")})
    return parts


def chance_rows(data: Path, task: str) -> list[dict]:
    """What guessing gives: k independent uniform draws from the split's own answers (a row whose
    draw is right with probability p: pass@k = 1 - (1 - p)^k), and always the split's most common
    answer (pass@1 only); bench/learn/families.py's guessing, where a guess is right only when fully
    right, as a sample is in pass@k (TRANCE's partial credit does not count)."""
    from bench.learn.families import guess_scores

    rows = []
    for split in ("id", "ood"):
        uniform, majority, m = guess_scores(data, task, split, full=True)
        row = {"split": split, "model": f"uniform guess over the {m} answers"}
        row |= {f"pass@{k}": statistics.mean(1 - (1 - p) ** k for p in uniform) for k in KS}
        rows += [row, {"split": split, "model": "majority answer", "pass@1": statistics.mean(majority)}]
    return rows


def binomial_se(p: float, problems: int) -> float:
    """The standard error of a model's mean score ``p`` over ``problems`` (the problems and, for
    pass@k, the samples as the noise): sqrt(p (1 - p) / problems), exact where a problem scores 0
    or 1 (greedy counting and geometry, pass@k at k = n), an upper bound otherwise."""
    return math.sqrt(max(p * (1 - p), 0.0) / problems)


def spread(rows: list[dict], key: str) -> str:
    """``key`` over the rows: mean ± std over the seeds, or for one model (the warm start) its value ±
    its standard error over the problems (:func:`binomial_se`), where a redraw of its samples moves
    pass@16 by a few points (bench/LEARNING.md)."""
    if len(rows) == 1:
        p = rows[0][key]
        return f"{p:.3f} ± {binomial_se(p, rows[0]['problems']):.3f}"
    return mean_std([r[key] for r in rows])


def table(results: dict[str, list[dict]], chance: list[dict] | None = None) -> str:
    lines = [
        "| arm | split | " + " | ".join(f"pass@{k}" for k in KS) + " |",
        "|---|---|" + "---|" * len(KS),
    ]
    for arm, rows in results.items():
        for split in ("id", "ood"):
            mine = [r for r in rows if r["split"] == split]
            cells = [spread(mine, f"pass@{k}") for k in KS]
            lines.append(f"| {arm} | {split.upper()} | " + " | ".join(cells) + " |")
    for r in chance or []:
        cells = [f"{r[f'pass@{k}']:.3f}" if f"pass@{k}" in r else "-" for k in KS]
        lines.append(f"| {r['model']} | {r['split'].upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(finals: dict[str, dict[str, list[dict]]], chance: dict | None = None) -> str:
    """Greedy accuracy on the large test splits: one row per arm, ID, OOD and their mean per family,
    then what guessing scores on the same splits (``chance``: bench/learn/families.py's ``guessing`` per
    family)."""
    from bench.learn.families import NAMES, guessing_rows

    fams = list(finals)
    arms = list(dict.fromkeys(a for f in fams for a in finals[f]))
    lines = [
        "| model | " + " | ".join(f"{NAMES[f]} ID | {NAMES[f]} OOD | {NAMES[f]} mean" for f in fams) + " |",
        "|---|" + "---|" * (3 * len(fams)),
    ]
    for arm in arms:
        cells = []
        for f in fams:
            rows = finals[f].get(arm, [])
            if not rows:
                cells += ["-"] * 3
                continue
            by = {sp: [r for r in rows if r["split"] == sp] for sp in ("id", "ood")}
            # a seed's mean of its two scores; one model's standard error of it: as over the two
            # splits' problems pooled (an upper bound on the exact one)
            means = [
                {"accuracy": (i["accuracy"] + o["accuracy"]) / 2, "problems": i["problems"] + o["problems"]}
                for i, o in zip(by["id"], by["ood"], strict=True)
            ]
            cells += [spread(by["id"], "accuracy"), spread(by["ood"], "accuracy"), spread(means, "accuracy")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if chance:
        lines += guessing_rows(chance, fams)
    return "\n".join(lines)


def claim_cells(finals: dict[str, list[dict]], passes: dict[str, list[dict]], conv: dict | None) -> dict:
    """One family's cells of :func:`bar_table` (EKIPL against GRPO) and the numbers they average:
    ID and OOD differences on the final splits (± the standard error of the difference over the
    seeds), pass@16 of EKIPL, GRPO and the warm start, and EKIPL's steps to GRPO's final ID accuracy
    on the in-loop curves (``conv``: bench/learn/families.py's summary; None where the runs are absent)."""
    from bench.learn.families import diff_se, reach_text

    cells, nums = {}, {}
    for split in ("id", "ood"):
        acc = {
            a: [r["accuracy"] for r in finals.get(a, []) if r["split"] == split] for a in ("ekipl", "grpo")
        }
        if all(acc.values()):
            d, se = diff_se(acc["ekipl"], acc["grpo"])
            cells[split], nums[split], nums[f"{split}_var"] = f"{d:+.3f} ± {se:.3f}", d, se**2
        pk = {
            a: [r["pass@16"] for r in passes.get(a, []) if r["split"] == split]
            for a in ("ekipl", "grpo", "warm start")
        }
        if all(pk.values()):
            means = [statistics.mean(pk[a]) for a in ("ekipl", "grpo", "warm start")]
            cells[f"pass_{split}"] = " / ".join(f"{m:.3f}" for m in means)
            nums[f"pass_{split}"] = means
    if conv and "ekipl" in conv:
        g, e = conv["grpo"], conv["ekipl"]
        if g["grpo_final"][0] <= statistics.mean(g["start_id"]) + 1e-9:
            cells["reach"] = "- (GRPO ends at or below its warm start)"
        else:
            cells["reach"] = reach_text(e["reach"])
            got = [r for r in e["reach"] if r is not None]
            nums["reach"] = (statistics.mean(got) if got else None, len(got) == len(e["reach"]))
    return {"cells": cells, "nums": nums}


def bar_table(claims: dict[str, dict], steps: int) -> str:
    """The issue's bar: the paper's three claims, EKIPL against GRPO, per family and averaged over
    the families that measured them (a verdict on the average, as the bar is stated)."""
    from bench.learn.families import NAMES

    fams = list(claims)
    lines = [
        "The bar: the paper's claims, EKIPL against GRPO, per family and averaged over the families "
        "(claim 1 on the final splits, ± the standard error of the difference over the seeds, the "
        "mean's pooling the families'; claim 2 on pass@16 of the validated splits, EKIPL / GRPO / "
        f"the warm start; claim 3 on the in-loop ID curves, of {steps} steps):",
        "",
        "| goal | " + " | ".join(NAMES[f] for f in fams) + " | mean over the families | verdict |",
        "|---|" + "---|" * (len(fams) + 2),
    ]
    for key, goal in (("id", "ID: EKIPL − GRPO ≥ +0.050"), ("ood", "OOD: EKIPL − GRPO ≥ 0")):
        got = [claims[f]["nums"] for f in fams if key in claims[f]["nums"]]
        mean, verdict = "-", "not measured"
        if got:
            m = statistics.mean(n[key] for n in got)
            se = math.sqrt(sum(n[f"{key}_var"] for n in got)) / len(got)
            mean = f"{m:+.3f} ± {se:.3f} ({len(got)})"
            verdict = "met" if m >= (0.05 if key == "id" else 0.0) - 1e-9 else "not met"
        lines.append(_bar_row(goal, [claims[f]["cells"].get(key, "-") for f in fams], mean, verdict))
    for key, goal in (
        ("pass_id", "pass@16 ID: EKIPL ≥ GRPO and the warm start"),
        ("pass_ood", "pass@16 OOD: the same"),
    ):
        got = [claims[f]["nums"][key] for f in fams if key in claims[f]["nums"]]
        mean, verdict = "-", "not measured"
        if got:
            e, g, w = (statistics.mean(x[i] for x in got) for i in range(3))
            mean = f"{e:.3f} / {g:.3f} / {w:.3f} ({len(got)})"
            verdict = "met" if e >= max(g, w) - 1e-9 else "not met"
        lines.append(_bar_row(goal, [claims[f]["cells"].get(key, "-") for f in fams], mean, verdict))
    got = [claims[f]["nums"]["reach"] for f in fams if "reach" in claims[f]["nums"]]
    mean, verdict = "-", "not measured"
    if got and all(m is not None for m, _ in got):
        m = statistics.mean(x for x, _ in got)
        mean = f"{m:.1f} ({len(got)})"
        verdict = "met" if m <= steps / 2 and all(every for _, every in got) else "not met"
    elif got:
        verdict = "not met (a family's EKIPL never reached GRPO's final)"
    goal = f"steps to GRPO's final ID: EKIPL ≤ {steps // 2} (half)"
    lines.append(_bar_row(goal, [claims[f]["cells"].get("reach", "-") for f in fams], mean, verdict))
    return "\n".join(lines)


def _bar_row(goal: str, cells: list[str], mean: str, verdict: str) -> str:
    return f"| {goal} | " + " | ".join(cells) + f" | {mean} | {verdict} |"


def plot(results: dict[str, dict[str, list[dict]]], path: Path, chance: dict[str, list[dict]]) -> None:
    """pass@k per arm, one row of panels (ID, OOD) per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.learn.families import NAMES

    fig, axes = plt.subplots(len(results), 2, figsize=(9, 3.4 * len(results)), squeeze=False)
    for row, (family, arms) in zip(axes, results.items(), strict=True):
        for ax, split in zip(row, ("id", "ood"), strict=True):
            for arm, rows in arms.items():
                mine = [r for r in rows if r["split"] == split]
                mu = [statistics.mean(r[f"pass@{k}"] for r in mine) for k in KS]
                sd = [statistics.stdev([r[f"pass@{k}"] for r in mine]) if len(mine) > 1 else 0.0 for k in KS]
                ax.errorbar(KS, mu, yerr=sd, marker="o", ms=3, capsize=2, label=arm)
            guess = next(r for r in chance[family] if r["split"] == split and "pass@2" in r)
            ax.plot(KS, [guess[f"pass@{k}"] for k in KS], "k--", lw=1, label=guess["model"])
            ax.set_xscale("log", base=2)
            ax.set_xticks(KS, [str(k) for k in KS])
            ax.set_title(f"{NAMES[family]}, held-out {split.upper()}: pass@k", fontsize=9)
            ax.set_xlabel("k", fontsize=8)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_model_seed(run: Path, default: int) -> int:
    """The ``model.seed`` a kept run trained with (its config.json), which says whose warm start it
    started from; ``default`` where the run has no config."""
    config = run / "config.json"
    if not config.is_file():
        return default
    return int(json.loads(config.read_text())["model"].get("seed", default))


def kept_files(out: Path, file_name: str) -> dict[str, Path]:
    """Where an arm's evaluations are kept (``file_name``: :func:`name`'s): its pass@k on the
    validated splits and its greedy finals on the large ones."""
    return {"pass": out / f"{file_name}.json", "final": out / f"final-{file_name}.json"}


def kept(out: Path, arm: str, final: bool) -> bool:
    """Whether ``arm``'s evaluations are kept under ``out`` (the pass@k one and, with ``final``, the
    large-split one): then its policies are not needed again."""
    files = kept_files(out, name(arm))
    return all(files[part].is_file() for part in ["pass", *(["final"] if final else [])])


def family_models(
    family: str, root: Path, arms: list[str], seeds: list[int], model_seed: int, out: Path, final: bool
) -> dict[str, dict[str, str]]:
    """{arm: {name: policy path}} of a family's runs under ``root``, the warm start first. An arm
    is reported if its final policies exist or its evaluations are kept under ``out`` (the policies
    of bench/results/ runs are not in git; their evaluations are)."""
    from bench.learn.families import WARM
    from ekipl.modelref import resolve_model

    warm = "kept" if kept(out, "warm start", final) else str(resolve_model(WARM[family][0], model_seed))
    models = {"warm start": {"warm": warm}}
    for arm in arms:
        paths = {f"{arm}-s{s}": str(root / arm / f"seed{s}" / "policy") for s in seeds}
        missing = [p for p in paths.values() if not (Path(p) / "model.safetensors").is_file()]
        if missing and not kept(out, arm, final):
            print(f"[boundary] {family}/{arm}: no final policy at {missing}; left out", flush=True)
            continue
        models[arm] = paths
    return models


def name(arm: str) -> str:
    """The arm's file name under ``--out`` (the warm start's is ``warm``, as before)."""
    return "warm" if arm == "warm start" else arm


def parse_args(argv=None) -> argparse.Namespace:
    from bench.learn.families import ARMS, FAMILY_ARMS, add_families_option

    ap = argparse.ArgumentParser()
    add_families_option(ap)
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="counting's arms")
    ap.add_argument(
        "--family-arms", nargs="+", default=list(ARMS), choices=FAMILY_ARMS, help="the other families' arms"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="outputs/learning", help="make learn's runs (--out there)")
    ap.add_argument("--counting-runs", help="counting's runs (default: --runs)")
    ap.add_argument("--out", default="outputs/boundary")
    ap.add_argument("--max-tokens", type=int, default=128, help="the rollout's budget in make learn")
    ap.add_argument("--final-problems", type=int, default=1000, help="the final scores' split size (0: none)")
    ap.add_argument("--more", action="store_true", help="the arms beyond the paper too (make learn-more)")
    ap.add_argument("--max-num-seqs", type=int, default=EVAL_SEQS, help="the evaluation engine's")
    ap.add_argument("--md", default=str(HERE / "LEARNING.md"))
    ap.add_argument("--png", default=str(HERE / "boundary.png"))
    ap.add_argument("extra", nargs="*", help="the runs' overrides (model.seed=N: which warm starts)")
    args = ap.parse_args(argv)
    if args.more:
        args.arms = with_more(args.arms, MORE_ARMS)
        args.family_arms = with_more(args.family_arms, MORE_FAMILY_ARMS)
    return args


def evaluate_family(family: str, args: argparse.Namespace) -> dict:
    """One family's evaluations (kept ones read back) and what its report needs: pass@k per arm,
    the greedy finals per arm (None with ``--final-problems 0``), guessing on both kinds of split,
    the bar's cells and the runs' step count."""
    from bench.learn.families import (
        family_root,
        guessing,
        make_test_splits,
        summarize,
        temporary_splits,
        validated_splits,
    )
    from bench.learn.learning import curve, load_rows

    arms = args.arms if family == "counting" else args.family_arms
    own = family == "counting" and args.counting_runs
    root = Path(args.counting_runs) if own else family_root(Path(args.runs), family)
    out = Path(args.out) if family == "counting" else Path(args.out) / family  # where they always were
    run = root / arms[0] / f"seed{args.seeds[0]}"
    n = args.final_problems
    models = family_models(
        family, root, arms, args.seeds, run_model_seed(run, model_seed_of(args.extra)), out, n > 0
    )
    run_rows = load_rows(run)
    problems = int(curve(run_rows, "val/id/problems")[0][1])  # as bench/learn/families.py reads it
    data = validated_splits(run, family, problems)  # one data set for all
    large, guess = None, None
    if n:  # kept beside the evaluations while one is still to take, else only for guessing's rows
        todo = not all(kept(out, arm, True) for arm in models)
        large = (
            make_test_splits(run, family, n, out / f"data{n}") if todo else temporary_splits(run, family, n)
        )
        guess = guessing(large, family)
    both = {
        a: evaluate_arm(name(a), m, data, large, out, args.max_tokens, args.max_num_seqs)
        for a, m in models.items()
    }
    passes = {arm: rows for arm, (rows, _) in both.items()}
    finals = {arm: rows for arm, (_, rows) in both.items()} if n else None
    conv = None  # the in-loop curves, for claim 3 (kept with the runs' metrics)
    seeds = {a: [root / a / f"seed{s}" for s in args.seeds] for a in ("grpo", "ekipl")}
    if all((r / "metrics.jsonl").is_file() for rs in seeds.values() for r in rs):
        conv = summarize(
            {a: dict(zip(args.seeds, map(load_rows, rs), strict=True)) for a, rs in seeds.items()}
        )
    return {
        "passes": passes,
        "finals": finals,
        "chance": chance_rows(data, family),
        "guess": guess,
        "claims": claim_cells(finals or {}, passes, conv),
        "steps": curve(run_rows, "val/id/accuracy")[-1][0],
    }


def report(families: dict[str, dict], final_problems: int) -> str:
    """The pass@k tables, the final scores and the bar, from :func:`evaluate_family`'s results."""
    from bench.learn.families import NAMES

    text = (
        f"pass@k (unbiased, n = {max(KS)} samples per problem at temperature 1) on the held-out splits the "
        "runs validated on; mean ± std over the arm's seeds (the warm start, one model: ± its standard error "
        "over the problems, sqrt(p (1 - p) / problems), exact at k = 16); the last rows "
        "are what guessing gives on the same splits.\n\n"
        + "\n\n".join(f"**{NAMES[f]}**\n\n" + table(r["passes"], r["chance"]) for f, r in families.items())
    )
    finals = {f: r["finals"] for f, r in families.items() if r["finals"] is not None}
    if finals:
        guesses = {f: families[f]["guess"] for f in finals}
        text += (
            f"\n\nFinal scores: greedy accuracy on test splits of {final_problems} problems each "
            "(TRANCE: partial credit), mean ± std over seeds (the warm start: ± its standard error over "
            "the problems, an upper bound for TRANCE's partial credit); the last rows are what guessing "
            "scores on the same splits.\n\n" + final_table(finals, guesses)
        )
    steps = next(iter(families.values()))["steps"]
    return text + "\n\n" + bar_table({f: r["claims"] for f, r in families.items()}, steps)


def main(argv=None) -> int:
    from bench.learn.learning import write_markdown

    args = parse_args(argv)
    families = {family: evaluate_family(family, args) for family in args.families}
    text = report(families, args.final_problems)
    write_markdown(text, Path(args.md), BEGIN, END)
    plot(
        {f: r["passes"] for f, r in families.items()},
        Path(args.png),
        {f: r["chance"] for f, r in families.items()},
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
