"""Synthetic generator, loader (both published forms), prompts, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from bad_rows import malformed_rows

from ekipl.cli import main as cli
from ekipl.tasks import prompts
from ekipl.tasks.loader import load_task_file
from ekipl.tasks.rewards import score
from ekipl.tasks.sample import DataError, Sample
from ekipl.tasks.synth import HELD_OUT, make_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    for task in ("counting", "geometry", "trance"):
        make_dataset(task, out, n_train=12, n_test=6, seed=7)
    return out


def _tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generator_is_byte_identical_for_a_seed(synth, tmp_path):
    for task in ("counting", "geometry", "trance"):
        make_dataset(task, tmp_path / "again", n_train=12, n_test=6, seed=7)
        make_dataset(task, tmp_path / "other", n_train=12, n_test=6, seed=8)
    same, again, other = (
        _tree_digest(synth),
        _tree_digest(tmp_path / "again"),
        _tree_digest(tmp_path / "other"),
    )
    assert same == again and len(same) > 50
    assert same != other


@pytest.mark.parametrize("task", ["counting", "geometry", "trance"])
def test_generated_rows_load_and_their_cot_scores_full_marks(synth, task):
    for split in ("train", "test_id", "test_ood"):
        ds = load_task_file(synth / task / f"{split}.json")
        assert len(ds) == (12 if split == "train" else 6) and ds.report.skipped == []
        for s in ds:
            assert s.task == task and s.cot
            images = s.load_images()
            assert len(images) == (2 if task == "trance" else 1) and images[0].mode == "RGB"
            # The solver-written trace is a perfect action under the task's own reward.
            r = score(s.cot, s)
            assert (r.accuracy, r.format) == (1.0, 1.0), (s.id, s.cot, s.answer)


def test_counting_answers_match_the_scene(synth):
    rows = json.loads((synth / "counting" / "train.json").read_text())
    for row in rows:
        n = int(row["cot"].split("I count ")[1].split(" ")[0])
        assert 3 <= n <= 6 and 0 <= int(row["answer"]) <= n


def test_ood_split_is_shifted(synth):
    def pairs(split):
        rows = json.loads((synth / "counting" / f"{split}.json").read_text())
        out = []
        for row in rows:
            listed = row["cot"].split(": ", 1)[1].split(".")[0].split(", ")
            out.append([(d.split()[3], d.split()[1]) for d in listed])  # (shape, colour)
        return out

    assert all(not (set(p) & HELD_OUT) for p in pairs("train"))
    assert all(set(p) & HELD_OUT and len(p) >= 7 for p in pairs("test_ood"))
    views = {r["view"] for r in json.loads((synth / "trance" / "test_ood.json").read_text())}
    assert views <= {"left", "right"} and views


def test_geometry_reads_the_figure_and_its_letters_are_uniform(tmp_path):
    """The figure decides the formula (the question's text is the same for every figure); ID has
    rectangles and right triangles, OOD only parallelograms; the choice letters are uniform; the
    trace names the figure's fill, which is the colour drawn inside it, drawn independently of it."""
    from PIL import Image

    from ekipl.tasks.synth import GEOMETRY_FILLS, GEOMETRY_ID, GEOMETRY_OOD

    paths = make_dataset("geometry", tmp_path, n_train=400, n_test=40, seed=3)
    figures, letters, pairs = {}, [], set()
    for split, path in paths.items():
        rows = json.loads(path.read_text())
        named = [r["cot"].split("The figure is a ")[1].split(" with")[0].split(" ", 1) for r in rows]
        figures[split] = {figure for _, figure in named}
        for r, (fill, figure) in zip(rows, named, strict=True):
            # (60, 80) lies inside every figure: inside the rectangle, the right triangle and the
            # parallelogram alike
            assert Image.open(path.parent / r["image"]).getpixel((60, 80)) == GEOMETRY_FILLS[fill], r["id"]
            pairs.add((fill, figure))
        assert {r["problem"].split(". Find")[0].split(" are ")[0] for r in rows} == {
            "In the figure the labelled lengths"
        }
        letters += [r["answer"] for r in rows if r["answer"] in "ABCD"]
    assert figures["train"] == figures["test_id"] == set(GEOMETRY_ID)
    assert figures["test_ood"] == set(GEOMETRY_OOD)
    assert pairs == {(c, f) for c in GEOMETRY_FILLS for f in (*GEOMETRY_ID, *GEOMETRY_OOD)}
    counts = [letters.count(ch) for ch in "ABCD"]
    assert len(letters) > 150 and max(counts) / len(letters) < 0.33 and min(counts) / len(letters) > 0.17


def test_trance_ood_changes_the_view_not_the_text(synth):
    """One transformation per row, with values from Reason-RFT's sets; the question lists the initial
    objects' attributes (Reason-RFT's form) and is otherwise the ID splits' own in the OOD split,
    whose final state is seen from the side."""
    import re

    from ekipl.tasks.rewards import parse_steps
    from ekipl.tasks.synth import TRANCE_OBJECTS

    texts = set()
    for split in ("train", "test_id", "test_ood"):
        for r in json.loads((synth / "trance" / f"{split}.json").read_text()):
            # Reason-RFT's question form: the initial objects' attributes as tuples, then the question
            listed = re.fullmatch(r"The attributes of the initial objects: \[(.*)\]\. (.*)", r["problem"])
            assert listed, r["problem"]
            texts.add(listed.group(2))
            tuples = re.findall(r"\('(\d)', '(\w+)', '(\w+)', '(\w+)', '(\w+)'\)", listed.group(1))
            assert [int(t[0]) for t in tuples] == list(range(TRANCE_OBJECTS)), r["problem"]
            for i, shape, size, color, _ in tuples:  # the trace's initial state is the listed one
                assert f"Object {i} is a {size} {color} {shape} in the initial state" in r["cot"]
            ((func, obj, value),) = parse_steps(r["answer"])
            assert value in prompts.TRANCE_FUNCTIONS[func] and int(obj) < TRANCE_OBJECTS
            assert (r["view"] in ("left", "right")) == (split == "test_ood")
    assert texts == {"What transformations happened?"}


def test_trance_pictures_show_the_traced_states_and_ood_sees_them_from_the_side(tmp_path):
    """Generator 5: the object fills the frame, so its colour is the image's centre and its size the
    share of the frame it covers (over a quarter when large, under it when small), in both states
    and every split; the OOD final state is the ID rendering seen from the side (squeezed to 3/4
    of its width: the object's widest row shrinks), the initial image as in ID."""
    import re

    import numpy as np
    from PIL import Image

    from ekipl.tasks.synth import BACKGROUND, COLORS, TRANCE_OBJECTS

    assert TRANCE_OBJECTS == 1
    paths = make_dataset("trance", tmp_path, n_train=24, n_test=24, seed=5)
    pattern = re.compile(r"is a (\w+) (\w+) (\w+) in the initial state and a (\w+) (\w+) (\w+) in the final")

    def drawn(name: Path) -> np.ndarray:  # which pixels are not the background
        return (np.asarray(Image.open(name).convert("RGB")) != BACKGROUND).any(axis=-1)

    widths = {"test_id": [], "test_ood": []}
    for split, path in paths.items():
        for r in json.loads(path.read_text()):
            states = pattern.search(r["cot"]).groups()
            for (size, color, _shape), name in ((states[:3], r["image"][0]), (states[3:], r["image"][1])):
                pixels = np.asarray(Image.open(path.parent / name).convert("RGB"))
                assert tuple(pixels[60, 80]) == COLORS[color], (r["id"], name)  # (x, y) = (80, 60)
                share = (pixels != BACKGROUND).any(axis=-1).mean()
                assert (share > 0.25) == (size == "large"), (r["id"], name, share)
            if split in widths and states[3] == "large":
                widths[split].append(drawn(path.parent / r["image"][1]).sum(axis=1).max())
    assert widths["test_id"] and widths["test_ood"]
    assert max(widths["test_ood"]) < min(widths["test_id"])  # a large object seen from the side is narrower


def test_trance_trace_pairs_each_objects_states_and_names_the_one_change(synth):
    """Each object's two states side by side; the answer's object differs in exactly the answer's
    attribute, set to its value, and every other object is the same in both states."""
    import re

    from ekipl.tasks.rewards import parse_steps
    from ekipl.tasks.synth import TRANCE_OBJECTS

    pattern = re.compile(
        r"Object (\d) is a (\w+) (\w+) (\w+) in the initial state and a (\w+) (\w+) (\w+) in the final"
    )
    for split in ("train", "test_id", "test_ood"):
        for r in json.loads((synth / "trance" / f"{split}.json").read_text()):
            ((func, obj, value),) = parse_steps(r["answer"])
            states = pattern.findall(r["cot"])
            assert [int(s[0]) for s in states] == list(range(TRANCE_OBJECTS)), r["cot"]
            for i, *words in states:
                before, after = (
                    dict(zip(("size", "color", "shape"), words[:3], strict=True)),
                    dict(zip(("size", "color", "shape"), words[3:], strict=True)),
                )
                changed = {k for k in before if before[k] != after[k]}
                if int(i) == int(obj):
                    attr = func.removeprefix("change_")
                    assert changed == {attr} and after[attr] == value, r["cot"]
                    assert f"Object {i} is a" in r["cot"] and f"its {attr} changed to {value}" in r["cot"]
                else:
                    assert not changed, r["cot"]


def test_cli_data_make(tmp_path, capsys):
    assert (
        cli(["data", "make", "--task", "counting", "--out", str(tmp_path), "--n-train", "3", "--n-test", "2"])
        == 0
    )
    assert "counting  train" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "counting" / "train.json").read_text())) == 3


def test_sharegpt_form_and_solution_field(tmp_path, synth):
    img = "images/train/counting-train-000000.png"
    rows = [
        {
            "id": "s1",
            "image": img,
            "conversations": [
                {"from": "human", "value": "<image>How many objects are there?"},
                {"from": "gpt", "value": "<think>I see 4.</think><answer>4</answer>"},
            ],
        },
        {
            "id": "s2",
            "images": [img, img],
            "messages": [
                {"role": "user", "content": "Count them."},
                {"role": "assistant", "content": "<think>x</think><answer> 2 </answer>"},
            ],
        },
    ]
    (synth / "counting" / "sft.json").write_text(json.dumps(rows))
    ds = load_task_file(synth / "counting" / "sft.json", task="counting")
    a, b = ds[0], ds[1]
    assert (a.problem, a.answer, a.cot) == (
        "How many objects are there?",
        "4",
        rows[0]["conversations"][1]["value"],
    )
    assert b.answer == "2" and len(b.image_paths) == 2 and len(b.load_images()) == 2
    rl = [{"id": 9, "image": img, "problem": "How many?", "solution": "<answer> 5 </answer>"}]
    (synth / "counting" / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rl) + "\n")
    s = load_task_file(synth / "counting" / "rl.jsonl", task="counting")[0]
    assert (s.id, s.answer, s.cot) == ("9", "5", None)


def test_prompts_follow_reason_rft_wording():
    count = Sample(id="1", task="counting", problem="How many?", answer="3", image_paths=("a.png",))
    choice = Sample(id="2", task="geometry", problem="Find x.", answer="C", image_paths=("a.png",))
    num = Sample(id="3", task="geometry", problem="Find x.", answer="2.5", image_paths=("a.png",))
    tr = Sample(
        id="4",
        task="trance",
        problem="What changed?",
        answer="change_size(0, small)",
        image_paths=("a.png", "b.png"),
    )
    assert "final answer (number)" in prompts.user_text(count)
    assert "select the correct answer by writing the letter (A, B, C or D)" in prompts.user_text(choice)
    assert "final answer (float number or int number)" in prompts.user_text(num)
    t = prompts.user_text(tr)
    for f, values in prompts.TRANCE_FUNCTIONS.items():
        assert f in t and all(v in t for v in values)
    for s in (count, choice, num, tr):
        assert "<think> </think>" in prompts.user_text(s) and "<answer> </answer>" in prompts.user_text(s)
        msgs = prompts.build_messages(s)
        assert sum(p["type"] == "image" for p in msgs[0]["content"]) == len(s.image_paths)
        sys_msgs = prompts.build_messages(s, system_prompt=True)
        assert sys_msgs[0]["role"] == "system" and "<think>" in sys_msgs[0]["content"]
        assert "<answer> </answer>" not in sys_msgs[1]["content"][-1]["text"]


# --------------------------------------------------------------------------------------------------
# Bad input: the error names the file, the row id and the field.

GOOD = {"id": "r0", "image": "images/train/counting-train-000000.png", "problem": "How many?", "answer": "3"}


@pytest.mark.parametrize("row,field,message", malformed_rows(GOOD))
def test_malformed_rows_name_file_row_and_field(synth, row, field, message):
    path = synth / "counting" / f"bad-{field}.json"
    path.write_text(json.dumps([GOOD, row]))
    with pytest.raises(DataError) as e:
        load_task_file(path, task="counting")
    text = str(e.value)
    assert str(path) in text and "row 1" in text and f"field {field!r}" in text and message in text, text
    assert e.value.field == field and e.value.row == 1


def test_skip_bad_rows_counts_and_logs(synth, caplog):
    path = synth / "counting" / "mixed.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "r1", "image": "gone.png"}, {"id": "r2"}, [1, 2]]))
    ds = load_task_file(path, task="counting", skip_bad_rows=True)
    assert len(ds) == 1 and ds.report.total == 4 and len(ds.report.skipped) == 3
    assert "skipped 3 of 4 rows" in caplog.text


def test_corrupt_image_is_reported_when_decoded(synth):
    bad = synth / "counting" / "images" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    path = synth / "counting" / "corrupt.json"
    path.write_text(json.dumps([{**GOOD, "id": "c9", "image": "images/corrupt.png"}]))
    s = load_task_file(path, task="counting")[0]
    with pytest.raises(DataError, match=r"corrupt\.json, row 0 \(id='c9'\), field 'image': corrupt image"):
        s.load_images()


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "invalid JSON at line 1"),
        ('{"rows": 1}', "expected a JSON list"),
        ("[]", "no usable rows"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task_file(path, task="counting")
    with pytest.raises(DataError, match="data file not found"):
        load_task_file(tmp_path / "missing.json")


def test_duplicate_ids_and_unknown_loader_task(synth):
    path = synth / "counting" / "dup.json"
    path.write_text(json.dumps([GOOD, GOOD]))
    with pytest.raises(DataError, match="row 1 .*field 'id': duplicate id"):
        load_task_file(path, task="counting")
    with pytest.raises(DataError, match="unknown task 'chess'"):
        load_task_file(path, task="chess")


def test_cli_reports_data_errors_with_exit_code_2(tmp_path, capsys):
    assert cli(["models", "build", "tiny-nope"]) == 2
    assert "unknown tiny model 'tiny-nope'" in capsys.readouterr().err
