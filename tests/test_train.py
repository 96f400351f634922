"""The trainer: presets compose and validate, bad configs fail at start-up naming the key.

The end-to-end run through every real component is tests/test_cluster.py (submitted as a Ray job
to a multi-node cluster); crash/resume and faults are in tests/reliability/."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runs import CONF, compose

from ekipl.config import ConfigError, to_run_config

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# tiny models, data of their own
CPU_PRESETS = ("cpu_demo", "learn_counting", "learn_geometry", "learn_trance", "own_task")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset, tmp_path):
    data = (
        []
        if preset in CPU_PRESETS
        else [f"data.train_file={tmp_path}/train.json", f"data.image_root={tmp_path}"]
    )
    run, sources = to_run_config(compose([f"+experiment={preset}", *data]))
    assert run.rollout.group_size >= 1 and run.trainer.steps >= 1
    if preset not in CPU_PRESETS:  # the paper's setting, with Reason-RFT's rules
        task = preset.split("_")[0]
        assert run.data.task == task and run.rollout.group_size == 8 and run.rollout.max_tokens == 512
        assert (run.learner.lr, run.algorithm.kl_coef, run.rollout.temperature) == (1e-6, 0.04, 0.9)
        assert run.learner.zero_stage == 3 and run.learner.bf16 and sources
        assert run.model.max_pixels == 480_000  # Reason-RFT's image budget
        assert (run.algorithm.std, run.algorithm.eps, run.reward.format_rule) == (
            "sample",
            1e-4,
            "reason_rft",
        )
        grpo, _ = to_run_config(compose([f"+experiment={preset}", *data, "algorithm=grpo", "aux=none"]))
        assert (grpo.algorithm.std, grpo.algorithm.eps, grpo.reward.format_rule) == (
            "sample",
            1e-4,
            "reason_rft",
        )
    for s in sources:
        assert s.name in run.aux


def test_default_config_composes():
    run, sources = to_run_config(compose([]))
    assert sources == [] and run.rollout.selection == "topg"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rollout.group_size=50"], "rollout.group_size: G=50 is larger than the candidates per prompt"),
        (["algorithm.advantage=magic"], "algorithm.advantage: unknown 'magic'"),
        (["learner.zero_stage=5"], "learner.zero_stage must be 1, 2 or 3"),
        (["rollout.selection=replace"], "rollout.selection: 'replace' needs at least one aux source"),
        (["+aux.big.kind=vllm", "+aux.big.model=/no/such/model"], "aux.big.model: no such model directory"),
        (["logger.mode=loud"], "logger.mode: unknown 'loud'"),
        (["trainer.ray_address=auto", "trainer.ray_num_cpus=4"], "trainer.ray_num_cpus sets up a local Ray"),
        (["algorithm.std=biased"], "algorithm.std: unknown 'biased'"),
        (["reward.format_rule=loose"], "reward.format_rule: unknown 'loose'"),
        (["trainer.eval_every=-1"], "trainer.eval_every must be >= 0"),
        (["data.overlong=truncate"], "data.overlong: unknown 'truncate'"),
        (["model.max_pixels=0"], "model.max_pixels must be >= 1"),
        (["model.min_pixels=5000", "model.max_pixels=4000"], "model.min_pixels (5000) is above"),
        (["model.mm_cache_gb=-1"], "model.mm_cache_gb must be >= 0"),
        (["reward.timeout_s=0"], "reward.timeout_s must be > 0"),
        (["logger.init_timeout_s=0"], "logger.init_timeout_s must be > 0"),
        (
            ["data.train_file=/d/train.json", "trainer.eval_every=5"],
            "trainer.eval_every/eval_before_train: validation needs held-out splits",
        ),
    ],
)
def test_impossible_configs_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_run_config(compose(overrides))


def test_unknown_keys_and_wrong_types_fail_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="learner.nope"):
        compose(["learner.nope=1"])
    with pytest.raises(ConfigCompositionException, match="learner.lr"):
        compose(["learner.lr=fast"])


def test_cli_exits_with_code_2_and_a_message_for_a_bad_config(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ekipl.train", "rollout.group_size=50", f"trainer.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ekipl: error: rollout.group_size" in r.stderr


def test_cli_exits_with_code_2_for_bad_data(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "image": "missing.png", "problem": "How many?", "answer": "3"}]))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ekipl.train",
            f"data.train_file={bad}",
            "data.task=counting",
            f"trainer.output_dir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "bad.json, row 0 (id='x'), field 'image': image file not found" in r.stderr


def test_secrets_are_redacted_from_logged_config():
    from ekipl.train import redact

    tree = {"aux": {"gpt": {"api_key_env": "OPENAI_API_KEY", "api_key": "sk-123"}}, "wandb_token": "t"}
    assert redact({"rollout": {"max_tokens": 512, "aux_max_tokens": 9}}) == {
        "rollout": {"max_tokens": 512, "aux_max_tokens": 9}
    }
    assert redact(tree) == {
        "aux": {"gpt": {"api_key_env": "OPENAI_API_KEY", "api_key": "<redacted>"}},
        "wandb_token": "<redacted>",
    }


def test_plot_draws_curves_of_several_runs(tmp_path, capsys):
    from PIL import Image

    from ekipl.cli import main as cli

    for name, scale in (("a", 1.0), ("b", 2.0)):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "reward/policy/mean": scale * s, "actor/pg_loss": -s} for s in (1, 2, 3)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "curves.png"
    assert cli(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 400 and im.size[1] > 200
    assert cli(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_plot_smooths_per_step_curves_with_a_debiased_ema():
    from ekipl.plot import ema

    assert ema([1.0, 1.0, 1.0], 0.6) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull toward 0
    got = ema([0.0, 1.0], 0.5)
    assert got == pytest.approx([0.0, (0.5 * 0.0 * 0.5 + 0.5 * 1.0) / (1 - 0.25)])
    assert ema([3.0, 1.0], 0.0) == [3.0, 1.0]
    noisy = [1.0, 1.5] * 20
    smooth = ema(noisy, 0.9)
    assert max(smooth[10:]) - min(smooth[10:]) < 0.2 < max(noisy) - min(noisy)
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], 1.0)


def test_sampler_covers_each_row_once_per_epoch_and_peeking_does_not_advance():
    from ekipl.data import Sampler

    s = Sampler(7, seed=3, shuffle=True)
    peek = s.take(4, advance=False)
    first = s.take(7)
    assert first[:4] == peek and sorted(first) == list(range(7))
    second = s.take(7)
    assert sorted(second) == list(range(7)) and second != first  # a new shuffle each epoch
    again = Sampler(7, seed=3, shuffle=True)
    assert again.take(14) == first + second
