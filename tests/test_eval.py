"""ekipl.eval: pass@k, the split summary, the table, and the CLI's errors (the live path through
vLLM runs on the trained policy in tests/test_train.py)."""

from __future__ import annotations

import json
import math

import pytest

from ekipl.eval import main, pass_at_k, summarize, table


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(5, 2, 4) == 1.0  # fewer than k wrong samples: some k-subset is right
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(2, 1, 4)


def test_summarize_counts_only_full_marks_as_passes():
    greedy = [(1.0, 1.0), (0.5, 0.0)]  # accuracy, format (TRANCE partial credit gives 0.5)
    sampled = [[1.0, 0.0], [0.5, 0.5]]
    m = summarize(greedy, sampled, k=2)
    assert m == {"problems": 2, "accuracy": 0.75, "format": 0.5, "pass@1": 0.25, "pass@2": 0.5}
    md = table([{"model": "m", "split": "id", **m}])
    assert md.splitlines()[0] == "| model | split | problems | accuracy | format | pass@1 | pass@2 |"
    assert "| m | id | 2 | 0.750 | 0.500 | 0.250 | 0.500 |" in md


def test_pass_at_several_k_from_the_same_samples():
    """The reasoning-boundary curve: pass@1, 2, 4 from 4 samples per problem."""
    sampled = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
    m = summarize([(0.0, 1.0)] * 3, sampled, k=[4, 2, 1])
    want = {k: sum(pass_at_k(4, c, k) for c in (1, 0, 3)) / 3 for k in (1, 2, 4)}
    assert {k: m[f"pass@{k}"] for k in (1, 2, 4)} == pytest.approx(want)
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"] == pytest.approx(2 / 3)
    assert summarize([(0.0, 1.0)] * 3, sampled, k=2).keys() == {
        "problems",
        "accuracy",
        "format",
        "pass@1",
        "pass@2",
    }


def test_cli_bad_split_file_and_bad_k_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # a model directory as far as the path check goes
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([{"id": "a", "problem": "How many?"}]))
    assert main(["--model", str(tmp_path), "--split", f"id={bad}", "--task", "counting"]) == 2
    err = capsys.readouterr().err
    assert "ekipl eval: error:" in err and "row 0" in err and "field 'answer'" in err
    good = tmp_path / "ok.json"
    good.write_text(json.dumps([{"id": "a", "problem": "How many?", "answer": "3"}]))
    assert main(["--model", str(tmp_path), "--split", str(good), "--task", "counting", "--n", "2"]) == 2
    assert "pass@k needs n >= k" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--split", str(good), "--task", "counting", "--n", "-1"]) == 2
    assert "must be >= 0 (0: greedy only)" in capsys.readouterr().err
    both = ["--split", f"id={good}", "--greedy-split", f"id={good}"]
    assert main(["--model", str(tmp_path), *both, "--task", "counting"]) == 2
    assert "--split and --greedy-split both name ['id']" in capsys.readouterr().err
    seqs = ["--split", str(good), "--task", "counting", "--max-num-seqs", "0"]
    assert main(["--model", str(tmp_path), *seqs]) == 2
    assert "--max-num-seqs 0: must be >= 1" in capsys.readouterr().err
    bad_final = ["--split", str(good), "--greedy-split", f"final={bad}", "--task", "counting"]
    assert main(["--model", str(tmp_path), *bad_final]) == 2  # a greedy split's rows are checked as well
    assert "row 0" in capsys.readouterr().err


def test_greedy_only_reports_accuracy_and_no_pass_at_k():
    """``--n 0`` (the 1,000-problem final scores): greedy accuracy and format, no sampled pass@k."""
    from ekipl.eval import summarize

    out = summarize([(1.0, 1.0), (0.0, 1.0)], [], [1, 4])
    assert out == {"problems": 2, "accuracy": 0.5, "format": 1.0}
    sampled = summarize([(1.0, 1.0)], [[1.0, 0.0, 0.0, 0.0]], [1, 4])
    md = table([{"model": "m", "split": "final", **out}, {"model": "m", "split": "id", **sampled}])
    assert md.splitlines()[0] == "| model | split | problems | accuracy | format | pass@1 | pass@4 |"
    assert "| m | final | 2 | 0.500 | 1.000 | - | - |" in md  # a greedy-only split beside a sampled one


@pytest.mark.parametrize("system_prompt", [False, True])
def test_validation_and_eval_render_the_prompt_training_renders(tmp_path, tiny_vlm, system_prompt):
    """rollout.system_prompt reaches validation and ekipl.eval: their requests carry the prompt the
    rollout coordinator trains on, with the system message exactly when it is on."""
    from ekipl.config import to_run_config
    from ekipl.data import load_data
    from ekipl.eval import split_requests
    from ekipl.models import hf
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.tasks.prompts import SYSTEM_PROMPT
    from ekipl.validation import Validator

    run, _ = to_run_config(
        {
            "data": {"synthetic_size": 8},
            "trainer": {"eval_every": 1, "output_dir": str(tmp_path)},
            "rollout": {"system_prompt": system_prompt},
        }
    )
    processor = hf.load_processor(tiny_vlm)
    scorer = run.reward.scorer()
    load_data(run, tmp_path, scorer.tasks)  # writes the synthetic held-out splits
    validator = Validator.from_config(run, tmp_path, processor, scorer)
    coord = RolloutCoordinator(run.rollout, None, [], processor, scorer)
    try:
        for name, samples in validator.splits.items():
            training = [coord.prompt(s) for s in samples]
            assert [r.prompt for r in validator.requests(name)] == training
            assert [r.prompt for r in split_requests(processor, samples, system_prompt)] == training
            assert all((SYSTEM_PROMPT in p) == system_prompt for p in training)
    finally:
        coord.shutdown()
        scorer.close()


def test_the_demo_states_the_paired_difference_with_its_standard_error():
    from ekipl.demo import paired_difference, verdict

    # 8 problems: EKIPL right on 5, GRPO on 3; they agree on 4 of them
    ekipl = [1, 1, 1, 1, 1, 0, 0, 0]
    grpo = [1, 1, 1, 0, 0, 0, 0, 0]
    diff, se = paired_difference(ekipl, grpo)
    # differences 0,0,0,1,1,0,0,0: mean 0.25, sample variance (2 x 0.5625 + 6 x 0.0625) / 7
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt((2 * 0.5625 + 6 * 0.0625) / 7 / 8))
    assert "cannot separate" in verdict(diff, se) and "make learn" in verdict(diff, se)
    assert verdict(0.064, 0.015).startswith("EKIPL leads GRPO by +6.4 ± 1.5 points (4.3 standard errors)")
    assert verdict(-0.05, 0.01).startswith("GRPO leads EKIPL by 5.0")
