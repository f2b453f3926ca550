"""The synthetic generator: deterministic per seed, every task covered, closed vocabulary, reserved words."""

from __future__ import annotations

import random

import pytest

from training.demo import synthetic
from training.demo.synthetic import (
    HELD_OUT_TASKS,
    RESERVED_WORDS,
    TASKS,
    UnknownTaskError,
    make_examples,
    sample,
    vocabulary,
    words_of,
)

ALL_TASKS = list(TASKS) + list(HELD_OUT_TASKS)
EXPECTED_ANSWERS = {
    "color": set(synthetic.COLORS),
    "shape": set(synthetic.SHAPES),
    "where": set(synthetic.POSITIONS),
    "cell": {str(d) for d in range(1, 10)},
    "count": {str(d) for d in range(synthetic.MAX_COUNT + 1)},
    "stroke": set(synthetic.STROKES),
    "size": {"big", "small"},
    "side": {"left", "right"},
    "half": {"upper", "lower"},
}


def _fingerprint(examples):
    return [(e.task, e.question, e.answer, e.image.size, e.image.tobytes()) for e in examples]


def test_same_seed_same_examples_and_other_seed_differs():
    first = make_examples(ALL_TASKS, 3, seed=7)
    again = make_examples(ALL_TASKS, 3, seed=7)
    other = make_examples(ALL_TASKS, 3, seed=8)
    assert _fingerprint(first) == _fingerprint(again)
    assert _fingerprint(first) != _fingerprint(other)
    assert (
        sample("color", random.Random(3)).image.tobytes() == sample("color", random.Random(3)).image.tobytes()
    )


def test_make_examples_is_n_per_task_interleaved_and_independent_of_other_tasks():
    mixed = make_examples(["color", "count"], 4, seed=1)
    assert [e.task for e in mixed] == ["color", "count"] * 4
    alone = make_examples(["count"], 4, seed=1)
    assert _fingerprint([e for e in mixed if e.task == "count"]) == _fingerprint(alone)
    assert make_examples(["color"], 0, seed=1) == []


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_draws_rgb_images_and_all_its_answers(task):
    examples = make_examples([task], 120, seed=0)
    assert {e.answer for e in examples} == EXPECTED_ANSWERS[task]
    assert all(e.task == task and e.image.mode == "RGB" and e.image.size == (96, 96) for e in examples)
    assert len({e.question for e in examples}) >= 3, "each task should be asked in several natural phrasings"


def test_draw_size_is_honoured_and_bad_input_is_refused():
    assert sample("shape", random.Random(0), size=256).image.size == (256, 256)
    with pytest.raises(UnknownTaskError, match="choose one of"):
        sample("colour-of-sky", random.Random(0))
    with pytest.raises(UnknownTaskError):
        make_examples(["color", "nope"], 2, seed=0)
    with pytest.raises(ValueError, match="at least 24"):
        sample("color", random.Random(0), size=8)
    with pytest.raises(ValueError, match="n must be"):
        make_examples(["color"], -1, seed=0)


def test_pretraining_answers_speak_every_digit():
    answers = {e.answer for e in make_examples(list(TASKS), 150, seed=2)}
    assert {str(d) for d in range(10)} <= answers


def test_every_generated_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    assert len(vocab) == len(vocabulary()), "vocabulary() must not repeat words"
    for e in make_examples(ALL_TASKS, 60, seed=3):
        assert set(words_of(e.question)) <= vocab, e.question
        assert set(words_of(e.answer)) <= vocab, e.answer
    for question in synthetic.DIGIT_QUESTIONS:
        assert set(words_of(question)) <= vocab, question


def test_reserved_words_never_appear_in_pretraining_but_are_in_the_vocabulary():
    reserved = set(RESERVED_WORDS)
    assert reserved <= set(vocabulary())
    assert not reserved & set(synthetic.pretraining_words())
    for e in make_examples(list(TASKS), 80, seed=4):
        assert not reserved & set(words_of(e.question) + words_of(e.answer)), e.question
    assert {"big", "small", "upper", "lower"} <= reserved, "held-out answers that the base never speaks"
    held_out_questions = {e.question for e in make_examples(list(HELD_OUT_TASKS), 20, seed=5)}
    assert all(reserved & set(words_of(q)) for q in held_out_questions), (
        "held-out questions need a reserved word"
    )


def test_the_readme_questions_tokenise_to_known_words():
    vocab = set(vocabulary())
    for question in [
        "What color is the shape?",
        "What shape is this?",
        "Where is the shape?",
        "How many shapes are there?",
        "What's the colour of the shape?",
    ]:
        assert set(words_of(question)) <= vocab, question


def test_draw_scene_places_small_shapes_in_their_cell_and_refuses_unknown_items():
    image = synthetic.draw_scene([("square", "blue", 0)], size=96)
    pixels = image.load()
    lit = [(x, y) for x in range(96) for y in range(96) if sum(pixels[x, y]) > 60]
    assert lit and all(x < 32 and y < 32 for x, y in lit)
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic.draw_scene([("hexagon", "blue", 0)])
    with pytest.raises(ValueError, match="cell must be"):
        synthetic.draw_scene([("circle", "red", 9)])
