"""`make learn`, the paper's table in miniature: GRPO against EKIPL on Reason-RFT's three task
families (visual counting, structure perception, spatial transformation), ID and OOD.

Each family has its own CoT-SFT warm start and its own stronger auxiliary model (``ekipl.warm``:
``learn-qwen2-vl-<family>-sft`` and ``-aux``; counting's are ``learn-qwen2-vl-sft`` and ``-aux``),
and its preset (``conf/experiment/learn_<family>.yaml``: learn_counting's settings on that family's
synthetic rows). Arms: ``grpo`` and ``ekipl`` (the paper's recipe), over the same seeds, and with
``--arms`` any other of bench/learn/learning.py's arms that takes a family's preset (``ekipl_gated``, an
ablation; ``sft_traces`` is counting's own; ``--more``: ``MORE_FAMILY_ARMS`` too, as `make learn-more`
runs it). Counting's runs are bench/learn/learning.py's own
(``<out>/<arm>/seed<k>``, kept, not redone); the other families' go under
``<out>/<family>/<arm>/seed<k>``. Finished runs are kept: rerunning resumes the batch.

Writes LEARNING.md's main table between its markers, in the paper's layout (per family: ID, OOD
and their mean; a warm-start row; every cell mean ± std over the seeds), what guessing scores on
each split beside it, the three claims per family, and the curves, one row per family, to
bench/learning.png.

    .venv/bin/python -m bench.learn.families [--seeds 0 1 2] [--families counting geometry trance] \
        [--arms grpo ekipl ekipl_gated] [--more]
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.learn.learning import ARMS as LEARNING_ARMS
from bench.learn.learning import (
    DEFAULT_ARMS,
    MORE_ARMS,
    MORE_FAMILY_ARMS,
    batch_args,
    curve,
    finished,
    load_rows,
    mean_std,
    model_seed_of,
    plot,
    run_arm,
    steps_to_reach,
    with_more,
    write_markdown,
)

FAMILIES = ("counting", "geometry", "trance")
ARMS = ("grpo", "ekipl")  # the comparison every family's tables make
# what else a family can run: every bench/learn/learning.py arm but the SFT control, which is counting's
FAMILY_ARMS = [a for a in LEARNING_ARMS if a != "sft_traces"]
NAMES = {"counting": "counting", "geometry": "structure perception", "trance": "spatial transformation"}
WARM = {f: (f"learn-qwen2-vl-{f}-sft", f"learn-qwen2-vl-{f}-aux") for f in FAMILIES if f != "counting"}
WARM["counting"] = ("learn-qwen2-vl-sft", "learn-qwen2-vl-aux")
BEGIN, END = "<!-- families:begin (bench/learn/families.py writes this part) -->", "<!-- families:end -->"


def family_root(out: Path, family: str) -> Path:
    """Where a family's arms live: counting's are bench/learn/learning.py's own runs."""
    return out if family == "counting" else out / family


def guess_scores(
    data: Path, task: str, split: str, full: bool = False
) -> tuple[list[float], list[float], int]:
    """What guessing scores on each row of test split ``split``, under the validation's own scoring
    (TRANCE: partial credit): a uniform draw from the split's distinct answers of the row's kind (a
    choice letter or not: ``prompts.is_choice``), expected; always the kind's most common answer;
    and the number of distinct answers. ``full``: a guess counts only when fully right, as a
    sample does in ``ekipl.eval``'s pass@k (TRANCE's half credit counts as wrong there)."""
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.prompts import is_choice
    from ekipl.tasks.rewards import EVAL_ACCURACY

    graded = EVAL_ACCURACY[task]

    def score(text: str, s) -> float:
        value = graded(text, s)
        return float(value >= 1.0) if full else value

    rows = list(load_task_file(data / f"test_{split}.json"))
    kinds = collections.defaultdict(list)
    for s in rows:
        kinds[is_choice(s)].append(s.answer)
    answers = {k: sorted(set(v)) for k, v in kinds.items()}
    top = {k: collections.Counter(v).most_common(1)[0][0] for k, v in kinds.items()}

    def said(text: str) -> str:
        return f"<think>guess</think><answer>{text}</answer>"

    uniform = [statistics.mean(score(said(a), s) for a in answers[is_choice(s)]) for s in rows]
    majority = [score(said(top[is_choice(s)]), s) for s in rows]
    return uniform, majority, sum(len(v) for v in answers.values())


def make_test_splits(run: Path, family: str, problems: int, root: Path) -> Path:
    """A run's ID and OOD test splits at ``problems`` rows each, generated from its config's data seed
    into ``root/<family>`` (kept there: a second call reuses them). Every row is seeded by its index,
    so any size's first rows are the in-loop split's, byte for byte."""
    from ekipl.tasks.synth import make_split

    if not (root / family / "test_ood.json").is_file():
        seed = json.loads((run / "config.json").read_text())["data"]["synthetic_seed"]
        for split in ("test_id", "test_ood"):
            make_split(family, split, problems, root, seed)
    return root / family


def validated_splits(run: Path, family: str, problems: int) -> Path:
    """The test splits a run validated on: its own copy, or (a run kept without its data, as in
    bench/results/) the same rows generated again (:func:`make_test_splits`)."""
    data = run / "data" / family
    if (data / "test_id.json").is_file():
        return data
    return temporary_splits(run, family, problems)


def temporary_splits(run: Path, family: str, problems: int) -> Path:
    """:func:`make_test_splits` into a folder removed at exit (a few seconds for 1,000 rows)."""
    root = Path(tempfile.mkdtemp(prefix="ekipl-families-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_test_splits(run, family, problems, root)


def guessing(data: Path, task: str) -> dict[str, dict[str, float]]:
    """Per test split, the mean over its rows of :func:`guess_scores`."""
    out = {}
    for split in ("id", "ood"):
        uniform, majority, _ = guess_scores(data, task, split)
        out[split] = {"uniform": statistics.mean(uniform), "majority": statistics.mean(majority)}
    return out


def guessing_rows(chance: dict[str, dict[str, dict[str, float]]], fams: list[str]) -> list[str]:
    """The paper-layout rows of what guessing scores (:func:`guessing` per family): ID, OOD and
    their mean per family, ``-`` where a family has none."""
    lines = []
    for kind, label in (("uniform", "uniform guess (the row's kind)"), ("majority", "majority answer")):
        cells = []
        for f in fams:
            if f not in chance:
                cells += ["-"] * 3
                continue
            i, o = chance[f]["id"][kind], chance[f]["ood"][kind]
            cells += [f"{i:.3f}", f"{o:.3f}", f"{(i + o) / 2:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict[str, list[float]]]:
    """Per arm: the warm start's and the final ID/OOD accuracy per seed, their means, and the steps
    to GRPO's final ID accuracy (the mean over GRPO's seeds)."""
    grpo_final = statistics.mean(curve(rows, "val/id/accuracy")[-1][1] for rows in runs["grpo"].values())
    out = {}
    for arm, seeds in runs.items():
        s: dict[str, list] = collections.defaultdict(list)
        for rows in seeds.values():
            for split in ("id", "ood"):
                points = curve(rows, f"val/{split}/accuracy")
                s[f"start_{split}"].append(points[0][1])
                s[f"final_{split}"].append(points[-1][1])
            s["start_mean"].append((s["start_id"][-1] + s["start_ood"][-1]) / 2)
            s["final_mean"].append((s["final_id"][-1] + s["final_ood"][-1]) / 2)
            s["format"].append(curve(rows, "val/id/format")[-1][1])
            s["reach"].append(steps_to_reach(curve(rows, "val/id/accuracy"), grpo_final))
        s["grpo_final"] = [grpo_final]
        out[arm] = dict(s)
    return out


def diff_se(a: list[float], b: list[float]) -> tuple[float, float]:
    """The difference of two arms' means and its standard error (independent seeds; 0 for one)."""
    se = (
        (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        if min(len(a), len(b)) > 1
        else 0.0
    )
    return statistics.mean(a) - statistics.mean(b), se


def diff(a: list[float], b: list[float]) -> str:
    """The difference of two arms' means, ± its standard error (independent seeds)."""
    d, se = diff_se(a, b)
    return f"{d:+.3f} ± {se:.3f}"


def reach_text(reach: list[int | None]) -> str:
    got = [r for r in reach if r is not None]
    return f"{statistics.mean(got):.1f} ({len(got)}/{len(reach)} seeds)" if got else f"never (0/{len(reach)})"


LABELS = {"grpo": "GRPO", "ekipl": "EKIPL", "ekipl_gated": "gated EKIPL"}


def tables(summary: dict[str, dict], chance: dict[str, dict], steps: int, problems: dict[str, int]) -> str:
    """The paper-layout table (a row per arm any family ran; ``-`` where a family did not run it)
    and the claims table (every other arm against GRPO, per family)."""
    fams = list(summary)
    head = " | ".join(f"{NAMES[f]} ID | {NAMES[f]} OOD | {NAMES[f]} mean" for f in fams)
    others = list(dict.fromkeys(a for f in fams for a in summary[f] if a not in ARMS))
    rows = [("warm start (CoT-SFT)", "grpo", "start")]
    rows += [(LABELS.get(a, a), a, "final") for a in [*ARMS, *others]]
    lines = [
        f"Held-out greedy accuracy after {steps} steps (TRANCE: partial credit, the paper's metric), "
        "mean ± std over seeds; problems per split: "
        + ", ".join(f"{NAMES[f]} {problems[f]}" for f in fams)
        + "; seeds per arm: "
        + ", ".join(f"{NAMES[f]} {len(summary[f]['grpo']['final_id'])}" for f in fams)
        + ". The warm-start row is step 0's validation of the GRPO runs.",
        "",
        f"| model | {head} |",
        "|---|" + "---|" * (3 * len(fams)),
    ]
    for label, arm, when in rows:
        cells = [
            mean_std(summary[f].get(arm, {}).get(f"{when}_{k}", []))
            for f in fams
            for k in ("id", "ood", "mean")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += guessing_rows(chance, fams)
    lines += [
        "",
        "The three claims per family: each arm − GRPO (± the standard error of the difference over "
        "independent seeds), the ID format, and the first validated step at which an arm reaches GRPO's "
        "final ID accuracy (GRPO's mean over its seeds; a seed that never does is counted apart):",
        "",
        "| family | arm | arm − GRPO, ID | arm − GRPO, OOD | ID format, GRPO / arm | GRPO's steps to its "
        "final ID | the arm's steps to GRPO's final ID |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fams:
        lines += [claims_row(f, arm, summary[f]) for arm in summary[f] if arm != "grpo"]
    return "\n".join(lines)


def claims_row(family: str, arm: str, summary: dict[str, dict]) -> str:
    g, e = summary["grpo"], summary[arm]
    # GRPO ending at or below its warm start: every arm "reaches" that at its first validation,
    # which says nothing about convergence
    below = g["grpo_final"][0] <= statistics.mean(g["start_id"]) + 1e-9
    reach = (
        ["- (GRPO ends at or below its warm start)"] * 2
        if below
        else map(reach_text, (g["reach"], e["reach"]))
    )
    return (
        f"| {NAMES[family]} | {LABELS.get(arm, arm)} | {diff(e['final_id'], g['final_id'])} | "
        f"{diff(e['final_ood'], g['final_ood'])} | {mean_std(g['format'])} / {mean_std(e['format'])} | "
        + " | ".join(reach)
        + " |"
    )


def curves_of(runs: dict, out: Path, seeds: list[int]) -> dict:
    """What the plot shows: every family's arms, and on counting every bench/learn/learning.py arm run."""
    if "counting" not in runs:
        return runs
    every = [*DEFAULT_ARMS, *MORE_ARMS]
    done = [a for a in every if all((out / a / f"seed{s}" / "done.json").is_file() for s in seeds)]
    counting = {a: {s: load_rows(out / a / f"seed{s}") for s in seeds} for a in done}
    return {**runs, "counting": counting or runs["counting"]}


def family_runs(root: Path, family: str, arms: list[str], seeds: list[int], steps: int) -> dict:
    """{arm: {seed: rows}} of a family's finished runs: the seeds where GRPO and EKIPL both
    finished (a partial batch reports what it has), and each other arm only where it finished all
    of those seeds (else it is left out, and this says so)."""
    seeds = [s for s in seeds if all(finished(root / a / f"seed{s}", steps) for a in ARMS)]
    if not seeds:
        raise SystemExit(f"{family}: no seed has finished runs of every arm under {root}")
    runs = {}
    for arm in dict.fromkeys([*ARMS, *arms]):
        missing = [s for s in seeds if not finished(root / arm / f"seed{s}", steps)]
        if missing:
            print(f"[families] {family}/{arm}: no finished run for seeds {missing}; left out", flush=True)
            continue
        runs[arm] = {s: load_rows(root / arm / f"seed{s}") for s in seeds}
    return runs


def add_families_option(ap: argparse.ArgumentParser) -> None:
    """``--families`` (the issue's ``--tasks``): one or more families alone; all by default."""
    ap.add_argument(
        "--families",
        "--tasks",
        nargs="+",
        default=list(FAMILIES),
        choices=FAMILIES,
        help="one or more families alone",
    )


def main(argv=None) -> int:
    ap = batch_args(argparse.ArgumentParser())
    add_families_option(ap)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=FAMILY_ARMS)
    ap.add_argument(
        "--counting-runs", help="where counting's runs are (default: --out, bench/learn/learning.py's)"
    )
    args = ap.parse_args(argv)
    args.arms = with_more(args.arms, MORE_FAMILY_ARMS) if args.more else args.arms
    if not set(ARMS) <= set(args.arms):
        ap.error("the tables compare EKIPL with GRPO: keep the grpo and ekipl arms")
    out, extra = Path(args.out), [f"trainer.eval_every={args.eval_every}", *args.extra]
    t_all = time.perf_counter()
    if not args.report_only:
        from ekipl.modelref import resolve_model

        model_seed = model_seed_of(args.extra)
        for family in args.families:
            for name in WARM[family]:  # built once, cached by recipe and model seed
                print(
                    f"[families] warm start {name} (seed {model_seed}): {resolve_model(name, model_seed)}",
                    flush=True,
                )
        for seed in args.seeds:  # seed-major: a partial batch still compares every family
            for family in args.families:
                for arm in args.arms:
                    root = family_root(out, family)
                    first = root / "grpo" / f"seed{args.seeds[0]}"  # its step-0 validation is everyone's
                    preset = f"learn_{family}"
                    took = run_arm(arm, seed, root, args.steps, extra, experiment=preset, step0=first)
                    acc = curve(load_rows(root / arm / f"seed{seed}"), "val/id/accuracy")
                    print(
                        f"[families] {family} {arm} seed {seed}: {took / 60:.1f} min, val ID "
                        + " ".join(f"{s}:{v:.2f}" for s, v in acc)
                        + f" (elapsed {(time.perf_counter() - t_all) / 60:.1f} min)",
                        flush=True,
                    )
    runs, summary, chance, problems = {}, {}, {}, {}
    for family in args.families:
        own = family == "counting" and args.counting_runs
        root = Path(args.counting_runs) if own else family_root(out, family)
        runs[family] = family_runs(root, family, args.arms, args.seeds, args.steps)
        summary[family] = summarize(runs[family])
        seed0, first = next(iter(runs[family]["grpo"].items()))
        problems[family] = int(curve(first, "val/id/problems")[0][1])
        chance[family] = guessing(
            validated_splits(root / "grpo" / f"seed{seed0}", family, problems[family]), family
        )
    text = tables(summary, chance, args.steps, problems)
    (out / "families.json").write_text(json.dumps({"summary": summary, "chance": chance}, indent=1))
    write_markdown(text, Path(args.md), BEGIN, END)
    plot(curves_of(runs, out, args.seeds), Path(args.png))
    print(text)
    print(f"[families] done in {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
