"""Your own task: reward functions by path, `datasets` sources with columns of your own, embedded
images, image budgets and overlong prompts, model paths refused like data paths, W&B without a
route, and the example under examples/own_task trained end to end on 2 ZeRO-3 ranks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from runs import compose, rows

from ekipl.tasks.loader import Columns, load_task_file
from ekipl.tasks.sample import DataError, Sample

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_task"

REWARDS = textwrap.dedent(
    """
    import time

    def exact(completion, sample, bonus=0.0):
        print("reward functions may print; it goes to stderr")
        hit = float(sample.answer in completion)
        return {"total": hit + bonus, "accuracy": hit, "format": float(sample.meta.get("kind") == "k")}

    def number(completion, sample):
        return 0.25

    def raises(completion, sample):
        raise KeyError("no such column")

    def hangs(completion, sample):
        while True:
            pass

    def sleeps(completion, sample):
        time.sleep(60)

    def nan(completion, sample):
        return float("nan")

    def text(completion, sample):
        return "1.0"

    def no_total(completion, sample):
        return {"accuracy": 1.0}

    not_callable = 3

    def one_arg(completion):
        return 1.0

    def needs_column(completion, sample):
        return float(sample.meta["no_such_column"])

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, scale=1.0):  # verl
        hit = float(ground_truth in solution_str)
        total = scale * (hit + 0.5 * (data_source == "mine"))
        return {"score": total, "acc": hit == 1.0, "kind": extra_info["kind"]}

    def easyr1_seq(reward_input, format_weight=0.5):  # EasyR1 reward_type=sequential
        acc = float(reward_input["ground_truth"] in reward_input["response"])
        return {"overall": acc + reward_input["response_length"], "accuracy": acc, "format": format_weight}

    def easyr1_batch(reward_inputs):  # EasyR1 reward_type=batch: every score says the batch's size
        return [{"overall": float(len(reward_inputs)), "accuracy": 0.0, "format": 1.0} for _ in reward_inputs]

    def batched(completions, samples, weight=1.0):  # ekipl's batch form: once per batch
        return [weight * len(completions) for _ in completions]
    """
)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARDS)
    return path


def S(task="mine", answer="42", **meta):
    return Sample(id="s1", task=task, problem="q", answer=answer, meta=meta)


def test_user_reward_contract_number_dict_kwargs_and_meta(reward_file):
    from ekipl.tasks.rewards import Reward
    from ekipl.tasks.scorer import Scorer

    sc = Scorer(function=f"{reward_file}:exact", function_kwargs={"bonus": 0.5})
    try:
        assert sc.score("<answer>42</answer>", S(kind="k")) == Reward(accuracy=1.0, format=1.0, total=1.5)
        assert sc.score("no", S()) == Reward(accuracy=0.0, format=0.0, total=0.5)
        assert sc.tasks is None and sc.errors == 0  # any task name: the user's function scores them all
    finally:
        sc.close()
    sc = Scorer(function=f"{reward_file}:number")
    try:  # a number is the total and the accuracy; format is ekipl's check of the text, not added
        assert sc.score("<think>a</think><answer>1</answer>", S()) == Reward(0.25, 1.0, 0.25)
    finally:
        sc.close()


@pytest.mark.parametrize("name", ["raises", "hangs", "sleeps", "nan", "text", "no_total"])
def test_a_faulty_user_reward_scores_zero_is_counted_and_logged_once(reward_file, name, caplog):
    from ekipl.tasks.rewards import ZERO
    from ekipl.tasks.scorer import Scorer

    sc = Scorer(function=f"{reward_file}:{name}", timeout_s=1.0)
    try:
        t0 = time.perf_counter()
        with caplog.at_level(logging.WARNING):
            got = [sc.score("<answer>42</answer>", S()) for _ in range(2)]
        assert got == [ZERO, ZERO]
        assert sc.metrics() == {"reward/errors": 2.0}
        assert caplog.text.count(f"reward my_reward.py:{name} failed") == 1, caplog.text
        assert time.perf_counter() - t0 < 10  # a hung call is cut at reward.timeout_s, twice
        # the worker is alive again afterwards (a hung one was killed and replaced)
        assert sc.score("x", S()) == ZERO and sc.errors == 3
    finally:
        sc.close()
    if name == "raises":
        assert "KeyError" in caplog.text and "no such column" in caplog.text


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{f}:missing", "has no function 'missing'"),
        ("{f}:not_callable", "'not_callable' is not callable"),
        ("{d}/nope.py:fn", "no such file"),
        ("{f}", "expected 'path/to/file.py:function_name'"),
        ("{f}:one_arg", "accepted contracts: ekipl: fn(completion, sample"),  # no contract fits
        ("{f}:needs_column", "one call on sample"),  # fits one, but a call on a real row fails
    ],
)
def test_a_bad_reward_function_exits_2_at_start_up_naming_the_key(
    monkeypatch, capsys, tmp_path, reward_file, spec, message
):
    from ekipl.train import main

    spec = spec.format(f=reward_file, d=tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["ekipl.train", f"reward.function={spec}", f"trainer.output_dir={tmp_path}/o"]
    )
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ekipl: error: reward.function: " in err and message in err, err


def test_verl_and_easyr1_reward_files_and_the_batch_form_are_called_as_written(reward_file):
    """The contract is told by the signature: verl's keyword call (task, answer, the row's other
    columns), EasyR1's reward_input dicts (sequential, and batched once per batch), and ekipl's
    batch form, once per batch; their results are brought to ekipl's reward."""
    from ekipl.tasks.rewards import Reward
    from ekipl.tasks.scorer import Scorer

    samples = [S(kind="k"), S(task="other", answer="7", kind="k")]
    texts = ["<answer>42</answer>", "no"]
    cases = [
        # no format of its own: ekipl's check of the text (no <think>: 0), logged, never added
        ("compute_score", {"scale": 2.0}, [Reward(1.0, 0.0, 3.0), Reward(0.0, 0.0, 0.0)]),
        ("easyr1_seq", {}, [Reward(1.0, 0.5, 4.0), Reward(0.0, 0.5, 2.0)]),  # + response_length
        ("easyr1_batch", {}, [Reward(0.0, 1.0, 2.0)] * 2),
        ("batched", {"weight": 0.5}, [Reward(1.0, 0.0, 1.0)] * 2),
    ]
    for name, kwargs, want in cases:
        sc = Scorer(function=f"{reward_file}:{name}", function_kwargs=kwargs)
        try:
            assert sc.score_batch(texts, samples, lengths=[3, 2]) == want, name
            assert sc.errors == 0
            sc.probe(samples[0])
        finally:
            sc.close()


def test_builtin_rewards_are_entries_of_the_same_registry():
    from ekipl.tasks import TASKS
    from ekipl.tasks import rewards as R
    from ekipl.tasks.scorer import Scorer

    assert set(R.REWARDS) == set(TASKS) and Scorer().tasks == tuple(R.REWARDS)
    weights = R.RewardWeights(accuracy=0.9, format=0.1)
    sc = Scorer(weights)
    text = "<think>a</think><answer>3</answer>"
    s = Sample(id="c", task="counting", problem="q", answer="3")
    assert sc.score(text, s) == R.score(text, s, weights) == R.Reward(1.0, 1.0, pytest.approx(1.0))
    t = Sample(id="t", task="trance", problem="q", answer="change_color(1, red), change_size(0, small)")
    pred = "<think>a</think><answer>change_color(1, blue), change_size(0, small)</answer>"
    assert sc.score(pred, t).accuracy == 0.5 and sc.score(pred, t, evaluation=True).accuracy == 0.75
    with pytest.raises(ValueError, match="no reward for task 'mine'"):
        sc.score(text, S())


# --------------------------------------------------------------------------------------------------
# Data through `datasets`


def example_data(out: Path) -> dict[str, Path]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_data
    finally:
        sys.path.remove(str(EXAMPLE))
    make_data.main(["--out", str(out), "--n-train", "16", "--n-test", "8"])
    return {"train": out / "train.parquet", "test": out / "test.parquet"}


COLUMNS = Columns(prompt="question", answer="label", image="picture", cot="trace")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    return example_data(tmp_path_factory.mktemp("own"))


def test_parquet_with_embedded_images_text_rows_and_columns_of_its_own(own_data, tmp_path):
    ds = load_task_file(own_data["train"], task="own", columns=COLUMNS, tasks=None, image_dir=tmp_path)
    s0, s1 = ds[0], ds[1]
    assert (s0.problem, s0.meta) == ("What colour is the square?", {"kind": "colour"})
    assert len(s0.image_paths) == 1 and s0.image_paths[0].startswith(str(tmp_path))
    assert s0.load_images()[0].size == (160, 120) and s0.cot.endswith(f"<answer>{s0.answer}</answer>")
    assert s1.image_paths == () and s1.meta == {"kind": "sum"} and s1.answer.isdigit()
    again = load_task_file(own_data["train"], task="own", columns=COLUMNS, tasks=None, image_dir=tmp_path)
    assert again[0].image_paths == s0.image_paths  # content-addressed: written once
    with pytest.raises(DataError, match="unknown task 'own'"):  # the built-in rewards cannot score it
        load_task_file(own_data["train"], task="own", columns=COLUMNS, image_dir=tmp_path)


def test_save_to_disk_directories_and_bad_rows_named(own_data, tmp_path):
    import datasets

    ds = datasets.Dataset.from_parquet(str(own_data["train"]))
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dd"))
    kw = dict(task="own", columns=COLUMNS, tasks=None, image_dir=tmp_path / "img")
    assert len(load_task_file(tmp_path / "one", **kw)) == 16
    assert len(load_task_file(f"{tmp_path / 'dd'}@test", **kw)) == 4
    with pytest.raises(DataError, match=r"name a split as .*@SPLIT; splits: \['test', 'train'\]"):
        load_task_file(tmp_path / "dd", **kw)
    bad = ds.map(lambda r, i: {"label": "" if i == 3 else r["label"]}, with_indices=True)
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError) as e:
        load_task_file(tmp_path / "bad.parquet", **kw)
    assert str(e.value).startswith(f"{tmp_path / 'bad.parquet'}, row 3, field 'label': empty answer")
    kept = load_task_file(tmp_path / "bad.parquet", skip_bad_rows=True, **kw)
    assert len(kept) == 15 and len(kept.report.skipped) == 1
    with pytest.raises(DataError, match="data file not found"):
        load_task_file(tmp_path / "missing.parquet", **kw)


def test_hub_dataset_by_name_and_split_from_the_local_cache(own_data, tmp_path):
    """``name@split`` through ``datasets.load_dataset``, offline: the cache is laid out as a first
    online ``load_dataset('ekipl-test/toy')`` leaves it in HF_DATASETS_CACHE."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = textwrap.dedent(
        f"""
        import json, shutil
        from pathlib import Path
        import datasets
        b = datasets.load_dataset_builder("parquet", data_files={{"test": {str(own_data["test"])!r}}})
        b.download_and_prepare()
        src = Path(b.cache_dir)
        cache = Path(datasets.config.HF_DATASETS_CACHE)
        dst = cache / "ekipl-test___toy" / "default" / src.parts[-2] / src.parts[-1]
        shutil.copytree(src, dst)
        for f in dst.glob("parquet-*.arrow"):
            f.rename(dst / f.name.replace("parquet-", "toy-"))
        info = json.loads((dst / "dataset_info.json").read_text())
        info.update(config_name="default", dataset_name="toy")
        (dst / "dataset_info.json").write_text(json.dumps(info))
        from ekipl.tasks.loader import Columns, load_task_file
        cols = Columns("question", "label", "picture", "trace")
        img = {str(tmp_path)!r}
        ds = load_task_file("ekipl-test/toy@test", task="own", columns=cols, tasks=None, image_dir=img)
        print(json.dumps([len(ds), len(ds[0].image_paths), ds[1].meta]))
        try:
            load_task_file("ekipl-test/absent@train", task="own", tasks=None)
        except Exception as e:
            print(type(e).__name__, e)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = r.stdout.strip().splitlines()[-2:]
    assert json.loads(first) == [8, 1, {"kind": "sum"}]
    assert second.startswith("DataError ekipl-test/absent@train: cannot read it with datasets"), second


# --------------------------------------------------------------------------------------------------
# Image budgets, overlong prompts, model paths


def test_the_image_budget_reaches_the_processor_and_the_engine_arguments(tiny_vlm, red_image):
    from ekipl.engines import vllm_backend as vb
    from ekipl.models import hf

    def tokens(proc):
        grid = proc.image_processor(images=[red_image], return_tensors="pt")["image_grid_thw"]
        return int(grid.prod()) // 4

    small = tokens(hf.load_processor(tiny_vlm, max_pixels=28 * 28 * 4))
    assert tokens(hf.load_processor(tiny_vlm)) > small and small <= 4
    kw = vb.engine_kwargs(vb.EngineSpec(model="m", min_pixels=100, max_pixels=28 * 28 * 4, mm_cache_gb=0.5))
    assert kw["mm_processor_kwargs"] == {"min_pixels": 100, "max_pixels": 3136}
    assert kw["mm_processor_cache_gb"] == 0.5
    assert "mm_processor_kwargs" not in vb.engine_kwargs(vb.EngineSpec(model="m"))
    assert vb.engine_kwargs(vb.EngineSpec(model="m"))["mm_processor_cache_gb"] == 0.0  # off by default


def test_overlong_prompts_are_dropped_and_counted_or_refused(tiny_vlm, own_data, tmp_path):
    from ekipl.config import to_run_config
    from ekipl.data import drop_overlong, prompt_length
    from ekipl.models import hf

    ds = load_task_file(own_data["train"], task="own", columns=COLUMNS, tasks=None, image_dir=tmp_path)
    proc = hf.load_processor(tiny_vlm)
    lengths = [
        prompt_length(proc, proc.apply_chat_template(_msgs(s), add_generation_prompt=True), s.image_paths)
        for s in ds
    ]
    image_rows = [i for i, s in enumerate(ds) if s.image_paths]
    enc = proc(
        text=[proc.apply_chat_template(_msgs(ds[0]), add_generation_prompt=True)],
        images=ds[0].load_images(),
        return_tensors="pt",
    )
    assert lengths[0] == enc["input_ids"].shape[1]  # the processor's own expansion of the image
    limit = min(lengths[i] for i in image_rows)  # every image prompt is longer than limit - 1
    run, _ = to_run_config(compose([f"model.max_model_len={limit}", "data.prompt_key=question"]))
    kept = drop_overlong(ds, proc, run, "train")
    assert len(kept) == len(ds) - len(image_rows) and kept.report.overlong == len(image_rows)
    assert all(not s.image_paths for s in kept)
    run, _ = to_run_config(
        compose([f"model.max_model_len={limit}", "data.overlong=error", "data.prompt_key=q"])
    )
    with pytest.raises(DataError, match=r"row 0 \(id='0'\), field 'q': the prompt is \d+ tokens"):
        drop_overlong(ds, proc, run, "train")


def _msgs(s):
    from ekipl.tasks.prompts import build_messages

    return build_messages(s)


def test_model_paths_are_refused_naming_the_key(tmp_path, capsys):
    from ekipl.config import ConfigError
    from ekipl.eval import main as eval_main
    from ekipl.modelref import resolve_model

    (tmp_path / "empty").mkdir()
    for path, message in (
        ("/no/such/dir", "'/no/such/dir' is neither a model directory"),
        ("nobody-has/this-model", "nor a HF id in the local cache"),
        (str(tmp_path / "empty"), "a directory without a config.json"),
    ):
        with pytest.raises(ConfigError, match=f"aux.big.model: .*{message}"):
            resolve_model(path, key="aux.big.model")
    split = tmp_path / "s.json"
    split.write_text(json.dumps([{"id": 1, "problem": "How many?", "answer": "3"}]))
    code = eval_main(["--model", "x=/no/such/dir", "--split", f"id={split}", "--task", "counting"])
    err = capsys.readouterr().err
    assert code == 2 and "ekipl eval: error: --model x: '/no/such/dir' is neither" in err, err


def test_unreachable_wandb_falls_back_to_offline_in_seconds(tmp_path, monkeypatch, caplog):
    """WANDB_API_KEY set, W&B at an address that refuses connections: the run logs offline."""
    from ekipl.config import LoggerConfig
    from ekipl.metrics import MetricsLog

    key = "f" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(LoggerConfig(init_timeout_s=3.0), tmp_path, {"a": 1})
    try:
        log.log(1, {"x": 1.0})
    finally:
        log.close()
    assert log.fell_back and time.perf_counter() - t0 < 60
    assert "W&B is unreachable" in caplog.text and f"wandb sync {tmp_path}/wandb/offline-run-*" in caplog.text
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert all(key not in p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# The example, end to end


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_own_task_example_trains_on_two_zero3_ranks_and_evaluates(
    ray_local, tmp_path, monkeypatch, capsys
):
    """README's "Your own task": examples/own_task's parquet (mixed image and text rows, embedded
    images), its reward file and the own_task preset (2 ZeRO-3 ranks, an image budget below the
    processor's default), through ``python -m ekipl.train``'s entry; then ``ekipl.eval`` on the
    exported policy with the same reward function, and on the base model loaded into the same
    engine."""
    from ekipl.eval import main as eval_main
    from ekipl.train import main

    data = example_data(tmp_path / "data")
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)  # the preset's reward file is relative to the repository
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "ekipl.train",
            "+experiment=own_task",
            f"data.train_file={data['train']}",
            f"data.val_files.test={data['test']}",
            "trainer.steps=2",
            "trainer.eval_every=2",
            "trainer.eval_limit=4",
            "trainer.save_every=0",
            "logger.mode=disabled",
            f"trainer.output_dir={out}",
        ],
    )
    main()
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2]
    for r in got:
        assert r["reward/traces/accuracy"] == 1.0 and r["reward/traces/format"] == 1.0  # the user's scores
        assert r["reward/errors"] == 0.0 and r["data/overlong_prompts"] == 0.0
        assert r["actor/rollout_logprob_diff"] < 1e-3  # engine and learner saw the same image tokens
    assert got[-1]["val/test/problems"] == 4.0 and "val/test/accuracy" in got[-1]
    capsys.readouterr()
    code = eval_main(
        [
            "--model",
            f"trained={out / 'policy'}",
            "--model",
            "base=tiny-qwen2-vl",  # loaded into the first model's engine
            "--split",
            f"test={data['test']}",
            "--greedy-split",  # as bench/learn/boundary.py's large final splits: greedy only, same engine
            f"final={data['test']}",
            "--max-num-seqs=8",
            "--task",
            "own",
            "--prompt-key=question",
            "--answer-key=label",
            "--image-key=picture",
            "--reward-function",
            str(EXAMPLE / "reward.py:score"),
            "--reward-kwargs",
            '{"format_weight": 0.5}',
            "--max-pixels=6272",
            "--limit=4",
            "--k=1",
            "--max-tokens=8",
            "--dtype=float32",
            f"--out={tmp_path / 'eval'}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [(r["model"], r["split"]) for r in table] == [
        ("trained", "test"),
        ("trained", "final"),
        ("base", "test"),
        ("base", "final"),
    ]
    assert all(r["problems"] == 4 and 0.0 <= r["accuracy"] <= 1.0 for r in table)
    for test, final in (table[:2], table[2:]):  # the same rows greedy: the same answers, no samples
        assert "pass@1" in test and "pass@1" not in final
        assert (final["accuracy"], final["format"]) == (test["accuracy"], test["format"])
    assert "| base | test |" in (tmp_path / "eval" / "eval.md").read_text()
