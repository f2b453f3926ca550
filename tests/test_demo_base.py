"""The shipped demo base model: loads offline, answers held-out synthetic and README questions."""

from __future__ import annotations

import io
import json
import random

import pytest
from PIL import Image

from training.demo.base import DEMO_BASE_DIR, DEMO_EXAMPLES_DIR, DemoRecipe, add_demo_commands
from training.demo.eval import HELD_OUT_SEED, evaluate
from training.demo.examples import EXAMPLES, ask, load_image
from training.demo.synthetic import TASKS, sample

SHIPPED_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "metrics.json",
]


@pytest.fixture(scope="module")
def demo():
    from m2pt.loading import load_frozen_llava

    return load_frozen_llava(str(DEMO_BASE_DIR), device="cpu", dtype="float32")


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="m2pt")
    add_demo_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_shipped_directory_is_complete_small_and_pickle_free():
    names = {p.name for p in DEMO_BASE_DIR.iterdir()}
    assert set(SHIPPED_FILES) <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))}
    assert sum(p.stat().st_size for p in DEMO_BASE_DIR.iterdir()) <= 25 * 1024 * 1024
    metrics = json.loads((DEMO_BASE_DIR / "metrics.json").read_text())
    assert metrics["held_out"]["overall"] >= 0.90
    assert set(metrics["held_out"]["per_task"]) == set(TASKS)
    assert (
        metrics["command"].startswith("m2pt demo train")
        and metrics["steps"] > 0
        and metrics["train_seconds"] > 0
    )


def test_shipped_model_loads_offline_with_ten_image_tokens(demo):
    assert demo.spec.num_image_tokens == 10 and demo.spec.image_size == 24
    assert type(demo.model).__name__ == "LlavaForConditionalGeneration"


def test_held_out_exact_match_is_at_least_90_percent(demo):
    result = evaluate(demo, list(TASKS), n=9, seed=HELD_OUT_SEED)  # 54 examples
    assert result.overall >= 0.90, result.misses


@pytest.mark.parametrize("size", [96, 256])
def test_png_at_any_draw_size_is_answered_through_the_processor(demo, size):
    for task in ["color", "shape", "count"]:
        example = sample(task, random.Random(f"png:{task}:{size}"), size=size)
        buffer = io.BytesIO()
        example.image.save(buffer, format="PNG")
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
        assert ask(demo, image, example.question) == example.answer, (task, size, example.question)


@pytest.mark.parametrize(
    "filename, question, expected",
    [
        ("red_circle.png", "What color is the shape?", "red"),
        ("red_circle.png", "What shape is this?", "circle"),
        ("three_shapes.png", "How many shapes are there?", "3"),
        ("blue_square_top_left.png", "Where is the shape?", "top left"),
        ("green_triangle.png", "What colour is the ball?", "green"),
    ],
)
def test_readme_questions_on_the_example_images(demo, filename, question, expected):
    assert ask(demo, load_image(DEMO_EXAMPLES_DIR / filename), question) == expected


def test_examples_answers_file_records_every_example_question():
    records = json.loads((DEMO_EXAMPLES_DIR / "answers.json").read_text())["answers"]
    expected = {(e.filename, q) for e in EXAMPLES for q, _ in e.expected}
    assert {(r["image"], r["question"]) for r in records} == expected


def test_eval_command_prints_per_task_accuracy_and_writes_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = _parser().parse_args(["demo", "eval", "--n", "2", "--json", str(out), "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert all(task in printed for task in TASKS) and "overall" in printed
    data = json.loads(out.read_text())
    assert set(data["per_task"]) == set(TASKS) and 0.0 <= data["overall"] <= 1.0


def test_ask_command_answers_a_local_image(capsys):
    args = _parser().parse_args(
        ["demo", "ask", str(DEMO_EXAMPLES_DIR / "red_circle.png"), "What color is the shape?"]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == "red"


def test_bad_inputs_get_clear_errors_and_change_nothing(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["demo", "eval", "--model", str(tmp_path / "missing"), "--json", ""])
    assert args.func(args) == 2
    assert "m2pt demo train" in capsys.readouterr().err
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"not a png at all")
    args = parser.parse_args(["demo", "ask", str(not_image), "What color is the shape?"])
    assert args.func(args) == 2
    assert "PNG, JPEG or WEBP" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    args = parser.parse_args(["demo", "train", "--out", str(existing), "--steps", "1"])
    assert args.func(args) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_train_command_writes_a_loadable_checkpoint_with_metrics(tmp_path, capsys):
    from m2pt.loading import load_frozen_llava

    out = tmp_path / "base"
    png = tmp_path / "curve.png"
    args = _parser().parse_args(
        [
            "demo",
            "train",
            "--out",
            str(out),
            "--steps",
            "3",
            "--eval-n",
            "2",
            "--curve-png",
            str(png),
            "--seed",
            "5",
        ]
    )
    assert args.func(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["seed"] == 5 and metrics["held_out"]["n_per_task"] == 2
    assert metrics["command"] == f"m2pt demo train --out {out} --steps 3 --seed 5 --threads 2"
    assert len(metrics["curve"]) == 1 and png.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no partial directory left behind"
    assert load_frozen_llava(str(out), device="cpu", dtype="float32").spec.num_image_tokens == 10
    assert DemoRecipe().steps >= 1000
