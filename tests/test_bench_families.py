"""bench/learn/families.py's arithmetic: what guessing scores per split (under the validation's own
scoring), and the paper-layout table from runs' metrics rows."""

from __future__ import annotations

import json

import pytest

from bench.learn import families


def _split(root, name, task, answers, red_image):
    red_image.save(root / "x.png")
    rows = [{"id": f"{name}{i}", "task": task, "image": "x.png", "problem": "q", "answer": a}
            for i, a in enumerate(answers)]  # fmt: skip
    (root / f"test_{name}.json").write_text(json.dumps(rows))


@pytest.mark.parametrize(
    "task, answers, uniform, majority",
    [
        # exact counts: a uniform draw from {1, 2} is right half the time; always "1": 2 of 3
        ("counting", ["1", "1", "2"], 0.5, 2 / 3),
        # letters and numbers are guessed within their own kind: {A, B} for the letter rows, {6}
        ("geometry", ["A", "B", "6"], (0.5 + 0.5 + 1.0) / 3, (1.0 + 0.0 + 1.0) / 3),
        # TRANCE's partial credit: the other row's step shares no function, so it scores 0
        ("trance", ["change_color(0, red)", "change_size(1, large)"], 0.5, 0.5),
    ],
)
def test_guessing_scores_a_uniform_draw_and_the_majority_answer(
    tmp_path, red_image, task, answers, uniform, majority
):
    for split in ("id", "ood"):
        _split(tmp_path, split, task, answers, red_image)
    got = families.guessing(tmp_path, task)
    assert got["id"] == got["ood"] == {"uniform": pytest.approx(uniform), "majority": pytest.approx(majority)}


def test_no_steps_to_grpos_final_when_grpo_ends_below_its_warm_start():
    """Claim 3's columns compare with GRPO's final ID accuracy; when that is not above the warm
    start's, every arm reaches it at its first validation, and the table says so instead."""
    runs = {
        "grpo": {0: _rows([0.5, 0.4, 0.45], [0.1] * 3), 1: _rows([0.5, 0.5, 0.45], [0.1] * 3)},
        "ekipl": {0: _rows([0.5, 0.45, 0.3], [0.1] * 3), 1: _rows([0.5, 0.3, 0.3], [0.1] * 3)},
    }
    chance = {"id": {"uniform": 0.1, "majority": 0.2}, "ood": {"uniform": 0.1, "majority": 0.2}}
    text = families.tables({"trance": families.summarize(runs)}, {"trance": chance}, 20, {"trance": 4})
    (claims,) = [x for x in text.splitlines() if x.startswith("| spatial transformation | EKIPL |")]
    assert claims.endswith(
        "| - (GRPO ends at or below its warm start) | - (GRPO ends at or below its warm start) |"
    )


def test_the_boundary_guess_counts_only_fully_right_answers_as_pass_at_k_does(tmp_path, red_image):
    """pass@k counts a sample right only when fully right (``ekipl.eval``), so the guessing rows
    beside it must too: on TRANCE a guess naming the right function with the wrong value has half
    credit in the accuracy table and none in pass@k."""
    from bench.learn import boundary

    answers = ["change_color(0, red)", "change_color(0, blue)"]
    for split in ("id", "ood"):
        _split(tmp_path, split, "trance", answers, red_image)
    assert families.guessing(tmp_path, "trance")["id"] == {
        "uniform": pytest.approx(0.75),  # the right answer 1.0, the other colour 0.5
        "majority": pytest.approx(0.75),
    }
    uniform, majority = boundary.chance_rows(tmp_path, "trance")[:2]
    assert uniform["pass@1"] == pytest.approx(0.5) and uniform["pass@2"] == pytest.approx(0.75)
    assert uniform["pass@16"] == pytest.approx(1 - 0.5**16) and majority["pass@1"] == pytest.approx(0.5)


def _rows(id_acc, ood_acc):
    metrics = {"val/id/format": 1.0, "val/id/problems": 4}
    pairs = enumerate(zip(id_acc, ood_acc, strict=True))
    return [{"step": 10 * i, "val/id/accuracy": a, "val/ood/accuracy": o, **metrics} for i, (a, o) in pairs]


def test_the_paper_table_has_the_warm_start_both_arms_guessing_and_the_claims():
    runs = {
        "grpo": {0: _rows([0.2, 0.3, 0.4], [0.1, 0.1, 0.2]), 1: _rows([0.2, 0.2, 0.2], [0.1, 0.2, 0.2])},
        "ekipl": {0: _rows([0.2, 0.5, 0.6], [0.1, 0.3, 0.3]), 1: _rows([0.2, 0.3, 0.4], [0.1, 0.1, 0.1])},
    }
    summary = families.summarize(runs)
    assert summary["grpo"]["grpo_final"] == [pytest.approx(0.3)]
    assert summary["ekipl"]["final_mean"] == [pytest.approx(0.45), pytest.approx(0.25)]
    assert summary["grpo"]["reach"] == [10, None] and summary["ekipl"]["reach"] == [10, 10]
    chance = {"id": {"uniform": 0.1, "majority": 0.25}, "ood": {"uniform": 0.2, "majority": 0.5}}
    text = families.tables({"geometry": summary}, {"geometry": chance}, 20, {"geometry": 4})
    lines = text.splitlines()
    assert "| warm start (CoT-SFT) | 0.200 ± 0.000 | 0.100 ± 0.000 | 0.150 ± 0.000 |" in lines
    assert "| GRPO | 0.300 ± 0.141 | 0.200 ± 0.000 | 0.250 ± 0.071 |" in lines
    assert "| majority answer | 0.250 | 0.500 | 0.375 |" in lines
    (claims,) = [x for x in lines if x.startswith("| structure perception |")]
    # EKIPL - GRPO on ID: 0.5 - 0.3, its standard error sqrt(0.02/2 + 0.02/2) = 0.141
    assert claims.startswith("| structure perception | EKIPL | +0.200 ± 0.141 | +0.000 ± 0.100 |")
    assert claims.endswith("| 10.0 (1/2 seeds) | 10.0 (2/2 seeds) |")


def _finished_run(root, arm, seed, id_acc):
    run = root / arm / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "done.json").write_text(json.dumps({"steps": 20, "seconds": 1.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(id_acc, [0.1] * 3)))


def test_another_arm_gets_its_row_and_claims_where_it_ran_and_a_dash_where_it_did_not(tmp_path, capsys):
    """``--arms grpo ekipl ekipl_gated``: an arm a family ran for all of GRPO's and EKIPL's seeds
    gets a row and a claims line there; a family that did not run it keeps its table, with ``-``."""
    for family, gated in (("geometry", False), ("trance", True)):
        for seed in (0, 1):
            _finished_run(tmp_path / family, "grpo", seed, [0.2, 0.3, 0.3])
            _finished_run(tmp_path / family, "ekipl", seed, [0.2, 0.3, 0.4])
            if gated or seed == 0:  # geometry's gated arm finished one seed of two: left out
                _finished_run(tmp_path / family, "ekipl_gated", seed, [0.2, 0.4, 0.5])
    arms = ["grpo", "ekipl", "ekipl_gated"]
    runs = {f: families.family_runs(tmp_path / f, f, arms, [0, 1], 20) for f in ("geometry", "trance")}
    assert list(runs["geometry"]) == ["grpo", "ekipl"] and list(runs["trance"]) == arms
    assert "geometry/ekipl_gated: no finished run for seeds [1]; left out" in capsys.readouterr().out
    chance = {"id": {"uniform": 0.1, "majority": 0.2}, "ood": {"uniform": 0.1, "majority": 0.2}}
    summary = {f: families.summarize(r) for f, r in runs.items()}
    lines = families.tables(summary, {f: chance for f in runs}, 20, {f: 4 for f in runs}).splitlines()
    (row,) = [x for x in lines if x.startswith("| gated EKIPL |")]
    assert row == "| gated EKIPL | - | - | - | 0.500 ± 0.000 | 0.100 ± 0.000 | 0.300 ± 0.000 |"
    (claims,) = [x for x in lines if x.startswith("| spatial transformation | gated EKIPL |")]
    assert claims.startswith("| spatial transformation | gated EKIPL | +0.200 ± 0.000 | +0.000 ± 0.000 |")
    assert not [x for x in lines if x.startswith("| structure perception | gated EKIPL |")]


def test_the_families_batch_refuses_arms_without_grpo_and_ekipl_and_the_sft_control(capsys):
    for arms in (["grpo", "ekipl_gated"], ["ekipl"], ["grpo", "ekipl", "sft_traces"]):
        with pytest.raises(SystemExit) as e:
            families.main(["--report-only", "--arms", *arms])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "keep the grpo and ekipl arms" in err and "invalid choice: 'sft_traces'" in err


@pytest.mark.parametrize("module", ["families", "boundary"])
def test_a_family_is_chosen_alone_with_tasks_and_an_unknown_one_is_refused(module, capsys):
    """The issue's ``--tasks`` is ``--families`` by another name, in the batch and in the boundary."""
    import importlib

    main = importlib.import_module(f"bench.learn.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--tasks", "geometry", "chess"])
    assert e.value.code == 2
    assert "argument --families/--tasks: invalid choice: 'chess'" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["geometry", "trance"])
def test_a_family_preset_has_its_own_models_and_grpo_drops_every_auxiliary_source(family):
    from runs import compose

    cfg = compose([f"+experiment=learn_{family}"])
    assert (cfg.model.path, cfg.data.synthetic_task) == (f"learn-qwen2-vl-{family}-sft", family)
    assert cfg.aux.aux_model.model == f"learn-qwen2-vl-{family}-aux" and cfg.aux.dataset.kind == "dataset"
    assert dict(compose([f"+experiment=learn_{family}", "algorithm=grpo", "aux=none"]).aux) == {}


def test_the_final_scores_table_averages_seeds_per_split_and_marks_a_missing_arm():
    """bench/learn/boundary.py's 1,000-problem table: per family ID, OOD and their per-seed mean; the one
    warm-start model with its standard error over the problems (not a std of ± 0.000)."""
    from bench.learn import boundary

    def rows(pairs):
        return [
            r
            for i, o in pairs
            for r in (
                {"split": "id", "accuracy": i, "problems": 100},
                {"split": "ood", "accuracy": o, "problems": 100},
            )
        ]

    finals = {
        "geometry": {"warm start": rows([(0.4, 0.2)]), "grpo": rows([(0.5, 0.3), (0.7, 0.1)])},
        "trance": {"warm start": rows([(0.1, 0.3)])},
    }
    lines = boundary.final_table(finals).splitlines()
    assert lines[0].startswith("| model | structure perception ID |") and len(lines) == 4
    # sqrt(p (1 - p) / 100); the mean's over the 200 problems of both splits
    warm = [
        "0.400 ± 0.049",
        "0.200 ± 0.040",
        "0.300 ± 0.032",
        "0.100 ± 0.030",
        "0.300 ± 0.046",
        "0.200 ± 0.028",
    ]
    assert lines[2] == "| warm start | " + " | ".join(warm) + " |"
    # grpo: ID 0.6 ± 0.141, OOD 0.2 ± 0.141, per-seed means 0.4 and 0.4; no TRANCE runs
    assert lines[3] == "| grpo | 0.600 ± 0.141 | 0.200 ± 0.141 | 0.400 ± 0.000 | - | - | - |"
    # what guessing scores on the same splits, ID, OOD and their mean; "-" for a family without
    chance = {
        "geometry": {"id": {"uniform": 0.1, "majority": 0.25}, "ood": {"uniform": 0.2, "majority": 0.15}}
    }
    lines = boundary.final_table(finals, chance).splitlines()
    assert lines[:4] == boundary.final_table(finals).splitlines() and len(lines) == 6
    assert lines[4] == "| uniform guess (the row's kind) | 0.100 | 0.200 | 0.150 | - | - | - |"
    assert lines[5] == "| majority answer | 0.250 | 0.150 | 0.200 | - | - | - |"


@pytest.mark.parametrize("task", ["geometry", "trance"])
def test_a_large_test_split_begins_with_the_in_loop_split(tmp_path, task):
    """The final scores' 1,000-problem splits extend the 128-problem ones the runs validated on:
    every row is seeded by its index, so the small split is the large one's first rows, images and
    all (shown here at 3 and 7)."""
    from ekipl.tasks.synth import make_split

    small = json.loads(make_split(task, "test_ood", 3, tmp_path / "small", 0).read_text())
    large = json.loads(make_split(task, "test_ood", 7, tmp_path / "large", 0).read_text())
    assert large[:3] == small and len(large) == 7
    for r in small:
        for name in [r["image"]] if isinstance(r["image"], str) else r["image"]:
            a, b = (tmp_path / d / task / name for d in ("small", "large"))
            assert a.read_bytes() == b.read_bytes()


def test_an_arm_whose_evaluations_are_kept_is_reported_without_its_policies(tmp_path, capsys):
    """bench/results/ keeps the runs' metrics and the evaluations' JSON, not the policies: the
    boundary report takes such an arm from its kept evaluations (and builds no warm start for it),
    and leaves out an arm that has neither."""
    from bench.learn import boundary

    for arm in ("warm", "final-warm", "grpo", "final-grpo", "ekipl"):  # ekipl's final one is missing
        (tmp_path / f"{arm}.json").write_text("[]")
    root = tmp_path / "runs"  # no policies under it
    models = boundary.family_models("geometry", root, ["grpo", "ekipl"], [0, 1], 0, tmp_path, True)
    assert list(models) == ["warm start", "grpo"] and models["warm start"] == {"warm": "kept"}
    assert "geometry/ekipl: no final policy" in capsys.readouterr().out
    without_finals = boundary.family_models("geometry", root, ["ekipl"], [0], 0, tmp_path, False)
    assert list(without_finals) == ["warm start", "ekipl"]
    nowhere = tmp_path / "no-data"
    kept = boundary.evaluate_arm("grpo", models["grpo"], nowhere, nowhere, tmp_path, 128)
    assert kept == ([], [])  # both kept: no ekipl.eval runs (its data does not exist)
    assert "grpo.json: evaluated earlier, kept" in capsys.readouterr().out


def test_one_evaluation_per_arm_is_kept_as_its_pass_at_k_and_its_final_scores():
    """bench/learn/boundary.py runs pass@k on the validated splits and greedy on the large ones in one
    ``ekipl.eval`` (one engine start per arm); its rows go back to the two files kept before."""
    from bench.learn import boundary

    rows = [
        {"model": "m-s0", "split": "id", "pass@16": 0.9},
        {"model": "m-s0", "split": "final_id", "accuracy": 0.4},
        {"model": "m-s0", "split": "ood", "pass@16": 0.2},
        {"model": "m-s0", "split": "final_ood", "accuracy": 0.1},
    ]
    parts = boundary.by_part(rows)
    assert [r["split"] for r in parts["pass"]] == ["id", "ood"] and parts["pass"][0]["pass@16"] == 0.9
    assert parts["final"] == [
        {"model": "m-s0", "split": "id", "accuracy": 0.4},
        {"model": "m-s0", "split": "ood", "accuracy": 0.1},
    ]


def test_the_boundary_takes_a_kept_runs_model_seed_from_its_config(tmp_path):
    from bench.learn import boundary

    (tmp_path / "config.json").write_text(json.dumps({"model": {"seed": 1}}))
    assert boundary.run_model_seed(tmp_path, 0) == 1 and boundary.run_model_seed(tmp_path / "none", 3) == 3


def test_make_learn_runs_the_issues_plan_and_learn_more_adds_every_other_arm():
    """`make learn` runs the paper's arms and the three ablations (bench/learn/learning.py's defaults);
    `make learn-more` runs each batch with ``--more``: the same plus MORE_ARMS on counting and
    MORE_FAMILY_ARMS on the other families, each of them runnable there, none twice."""
    import re
    from pathlib import Path

    from bench.learn import families, learning

    assert learning.DEFAULT_ARMS == ["grpo", "ekipl", *learning.ABLATIONS]
    make = (Path(__file__).resolve().parent.parent / "Makefile").read_text()

    def recipe(target):
        return re.findall(r"^\t(.+)$", re.search(rf"^{target}: .*\n((?:\t.*\n)+)", make, re.M).group(1), re.M)

    batches = ["bench.learn.learning", "bench.learn.families", "bench.learn.boundary"]
    assert recipe("learn") == [f"$(PY) -m {b}" for b in batches]
    assert recipe("learn-more") == [f"$(PY) -m {b} --more" for b in batches]
    counting = learning.with_more(learning.DEFAULT_ARMS, learning.MORE_ARMS)
    assert counting == [*learning.DEFAULT_ARMS, *learning.MORE_ARMS] and len(set(counting)) == len(counting)
    assert set(counting) <= set(learning.ARMS)
    others = learning.with_more(list(families.ARMS), learning.MORE_FAMILY_ARMS)
    assert others == ["grpo", "ekipl", "ekipl_gated"] and set(others) <= set(families.FAMILY_ARMS)


def test_the_pass_at_k_table_gives_the_one_warm_start_its_standard_error_and_arms_their_spread():
    from bench.learn import boundary

    def row(split, p, problems=128):
        return {"split": split, "problems": problems, **{f"pass@{k}": p for k in boundary.KS}}

    results = {
        "warm start": [row("id", 0.5), row("ood", 1.0)],
        "grpo": [row("id", 0.4), row("id", 0.6), row("ood", 0.2), row("ood", 0.2)],
    }
    lines = boundary.table(results).splitlines()
    assert lines[2] == "| warm start | ID |" + " 0.500 ± 0.044 |" * 5  # sqrt(0.25 / 128)
    assert lines[3] == "| warm start | OOD |" + " 1.000 ± 0.000 |" * 5
    assert lines[4] == "| grpo | ID |" + " 0.500 ± 0.141 |" * 5  # the std over the two seeds
    assert lines[5] == "| grpo | OOD |" + " 0.200 ± 0.000 |" * 5


def test_a_batch_measures_the_warm_starts_step_0_validation_once_and_every_run_shows_it(tmp_path):
    """Every run of a batch starts from one warm start and validates it greedily on one data set, so
    their step-0 rows are identical (all 30 runs of 2026-12-07's batches, checked); a run takes the
    batch's first run's row and completions instead of measuring them again, and only from a run
    that finished."""
    from bench.learn import learning

    first, run = tmp_path / "grpo" / "seed0", tmp_path / "ekipl" / "seed1"
    for d in (first, run):
        (d / "val").mkdir(parents=True)
    step0 = {"step": 0, "val/id/accuracy": 0.25, "val/ood/accuracy": 0.125, "timing/validation": 8.0}
    lines = [step0, {"step": 1, "reward/policy/mean": 1.0}]
    (first / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (first / "val" / "step_000000.id.jsonl").write_text('{"id": "a"}\n')
    (first / "val" / "step_000010.id.jsonl").write_text('{"id": "b"}\n')
    extra = ["trainer.eval_every=10", "model.seed=1"]
    assert learning.step0_row(first, 60, extra) is None  # not finished: the run measures its own
    cmd = ["python", "-m", "ekipl.train", "algorithm=grpo", "logger.mode=offline", *extra]
    (first / "done.json").write_text(json.dumps({"steps": 60, "seconds": 1.0, "cmd": cmd}))
    assert learning.step0_row(first, 30, extra) is None  # finished with other steps: another batch
    assert learning.step0_row(first, 60, ["trainer.eval_every=10"]) is None  # other overrides: too
    assert learning.step0_row(first, 60, extra) == step0 and learning.step0_row(None, 60, extra) is None
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/policy/mean": 0.5}) + "\n")
    learning.share_step0(run, first, step0)
    assert learning.load_rows(run) == [step0, {"step": 1, "reward/policy/mean": 0.5}]
    assert sorted(p.name for p in (run / "val").iterdir()) == ["step_000000.id.jsonl"]


def test_the_sft_control_evaluates_the_warm_start_of_the_runs_own_model_seed(tmp_path, monkeypatch):
    """The continued-SFT control scores its own starting point beside its result: with
    ``model.seed=1`` that is seed 1's warm start (the cached build's directory), not seed 0's."""
    from bench.learn import learning
    from ekipl import warm

    monkeypatch.setenv("EKIPL_CACHE", str(tmp_path / "cache"))
    name = "learn-qwen2-vl-sft"
    built = {}
    for seed in (0, 1):  # a finished build is its directory with ekipl_warm.json: nothing rebuilds
        digest = warm._digest(name, warm.WARM_STARTS[name], seed)
        built[seed] = tmp_path / "cache" / "models" / f"{name}-s{seed}-{digest}"
        built[seed].mkdir(parents=True)
        (built[seed] / "ekipl_warm.json").write_text("{}")
    for seed in (0, 1):
        extra = ["trainer.eval_every=10", *([f"model.seed={seed}"] if seed else [])]
        sft, ev = learning.sft_commands(tmp_path / "run", ["trainer.seed=0"], extra)
        assert f"model.seed={seed}" in sft or seed == 0
        assert ev[ev.index("--model") + 1] == f"warm={built[seed]}"


def test_the_bar_averages_each_claim_over_the_families_that_measured_it_and_gives_one_verdict():
    """The issue's bar, as bench/learn/boundary.py prints it: EKIPL − GRPO on the final splits per family
    (± the standard error of the difference) and averaged; pass@16 of EKIPL / GRPO / the warm start;
    EKIPL's steps to GRPO's final ID. A family without EKIPL, or whose GRPO never beat its warm
    start, is left out of that claim's mean."""
    from bench.learn import boundary

    def acc(pairs):
        return [{"split": sp, "accuracy": v} for i, o in pairs for sp, v in (("id", i), ("ood", o))]

    def p16(i, o):
        return [{"split": "id", "pass@16": i}, {"split": "ood", "pass@16": o}]

    def conv(start, grpo_final, reach):
        return {"grpo": {"grpo_final": [grpo_final], "start_id": [start]}, "ekipl": {"reach": reach}}

    a = boundary.claim_cells(
        {"grpo": acc([(0.4, 0.3), (0.6, 0.3)]), "ekipl": acc([(0.6, 0.3), (0.7, 0.4)])},
        {"ekipl": p16(0.9, 0.8), "grpo": p16(0.8, 0.8), "warm start": p16(0.85, 0.9)},
        conv(0.3, 0.5, [20, 10]),
    )
    b = boundary.claim_cells(
        {"grpo": acc([(0.5, 0.5), (0.5, 0.5)]), "ekipl": acc([(0.5, 0.4), (0.5, 0.4)])},
        {"ekipl": p16(1.0, 0.7), "grpo": p16(0.9, 0.8), "warm start": p16(0.9, 0.9)},
        conv(0.6, 0.5, [10, 10]),  # GRPO ends below its warm start: says nothing on claim 3
    )
    none = boundary.claim_cells({"grpo": acc([(0.5, 0.5)])}, {"grpo": p16(0.9, 0.9)}, None)
    lines = boundary.bar_table({"counting": a, "geometry": b, "trance": none}, 60).splitlines()
    head = "| goal | counting | structure perception | spatial transformation | mean over the families |"
    assert lines[2] == head + " verdict |"
    # counting ID +0.150 ± sqrt(0.02/2 + 0.005/2) = 0.112; geometry 0 ± 0; mean +0.075 ± 0.112 / 2
    assert (
        lines[4]
        == "| ID: EKIPL − GRPO ≥ +0.050 | +0.150 ± 0.112 | +0.000 ± 0.000 | - | +0.075 ± 0.056 (2) | met |"
    )
    assert (
        lines[5]
        == "| OOD: EKIPL − GRPO ≥ 0 | +0.050 ± 0.050 | -0.100 ± 0.000 | - | -0.025 ± 0.025 (2) | not met |"
    )
    assert lines[6].endswith("| 0.950 / 0.850 / 0.875 (2) | met |")
    assert lines[7] == (
        "| pass@16 OOD: the same | 0.800 / 0.800 / 0.900 | 0.700 / 0.800 / 0.900 | - "
        "| 0.750 / 0.800 / 0.900 (2) | not met |"
    )
    assert lines[8] == (
        "| steps to GRPO's final ID: EKIPL ≤ 30 (half) | 15.0 (2/2 seeds) "
        "| - (GRPO ends at or below its warm start) | - | 15.0 (1) | met |"
    )
    never = boundary.claim_cells({}, {}, conv(0.3, 0.5, [20, None]))
    assert boundary.bar_table({"counting": never}, 60).splitlines()[-1].endswith("| 20.0 (1) | not met |")


def test_the_report_gives_finals_and_guessing_only_for_the_families_that_took_finals():
    """bench/learn/boundary.py's report: a pass@k table per family, the final scores with what guessing
    scores on the large splits for the families evaluated on them (``--final-problems 0`` takes
    none), then the bar."""
    from bench.learn import boundary

    def family(finals, guess):
        passes = {
            "grpo": [
                {"split": sp, "problems": 10, **{f"pass@{k}": 0.5 for k in boundary.KS}}
                for sp in ("id", "ood")
            ]
        }
        chance = [{"split": sp, "model": "majority answer", "pass@1": 0.2} for sp in ("id", "ood")]
        claims = boundary.claim_cells(finals or {}, passes, None)
        return {
            "passes": passes,
            "finals": finals,
            "chance": chance,
            "guess": guess,
            "claims": claims,
            "steps": 60,
        }

    finals = {"grpo": [{"split": sp, "accuracy": 0.4, "problems": 1000} for sp in ("id", "ood")]}
    guess = {sp: {"uniform": 0.1, "majority": 0.3} for sp in ("id", "ood")}
    text = boundary.report({"geometry": family(finals, guess), "trance": family(None, None)}, 1000)
    assert "**structure perception**" in text and "**spatial transformation**" in text
    final = text.split("Final scores")[1].split("The bar")[0]
    assert "| model | structure perception ID |" in final and "spatial transformation ID" not in final
    assert "| majority answer | 0.300 | 0.300 | 0.300 |" in final
    assert "Final scores" not in boundary.report({"trance": family(None, None)}, 0)
