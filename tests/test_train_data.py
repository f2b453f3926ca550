"""Training data: LLaVA JSON parsing, bad records reported by index, labels on answers only, train/serve
tokenisation parity, the fixed digits split."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training.builtin import builtin_records, digits_split
from training.data import IGNORE_INDEX, DataOptions, encode_record, load_data, to_messages
from training.records import DataError, OnBad, Record, read_llava_json


def write_image(path, color=(255, 0, 0), size=20):
    Image.new("RGB", (size, size), color).save(path)


def good(image, question="what is this digit ?", answer="7"):
    return {
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        write_image(images / f"{i}.png", (80 * i, 0, 0))
    (images / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "secret.png").write_bytes((images / "0.png").read_bytes())
    (images / "link.png").symlink_to(tmp_path / "secret.png")
    return tmp_path


def write_json(folder, records):
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


BAD_CASES = [
    (good("missing.png"), "not found"),
    (good("broken.png"), "unreadable"),
    (
        {
            "image": "0.png",
            "conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "7"}],
        },
        "no <image>",
    ),
    (good("1.png", answer="   "), "empty answer"),
    (good("../secret.png"), "without '..'"),
    (good("/etc/hostname"), "relative"),
    (good("link.png"), "outside the image folder"),
    ({"image": "0.png", "conversations": [{"from": "human", "value": "<image> q"}]}, "pairs"),
    (
        {
            "image": "0.png",
            "conversations": [{"from": "gpt", "value": "<image> q"}, {"from": "human", "value": "a"}],
        },
        "turn 0",
    ),
    ("just a string", "not a JSON object"),
    (good(None), "missing 'image'"),
]


@pytest.mark.parametrize("record,reason", BAD_CASES)
def test_bad_record_is_reported_with_its_index_then_skipped_or_failed(folder, record, reason, caplog):
    path = write_json(folder, [good("0.png"), good("2.png"), record])
    with caplog.at_level(logging.WARNING):
        records, bad = read_llava_json(path, folder / "imgs", OnBad.SKIP)
    assert len(records) == 2 and [b.index for b in bad] == [2]
    assert reason in bad[0].reason
    assert f"record 2: {bad[0].reason}" in caplog.text
    with pytest.raises(DataError, match=r"record 2: .*--on-bad-record skip"):
        read_llava_json(path, folder / "imgs", OnBad.FAIL)


def test_all_bad_records_and_broken_files_fail_clearly(folder):
    path = write_json(folder, [good("missing.png")])
    with pytest.raises(DataError, match="all 1 records are bad"):
        read_llava_json(path, folder / "imgs", OnBad.SKIP)
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid UTF-8 JSON"):
        read_llava_json(folder / "bad.json", folder / "imgs")
    with pytest.raises(DataError, match="not found"):
        read_llava_json(folder / "nope.json", folder / "imgs")
    with pytest.raises(DataError, match="JSON list"):
        read_llava_json(write_json(folder, {"image": "0.png"}), folder / "imgs")


def decode_labels(tiny, enc):
    ids = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    return tiny.processor.tokenizer.convert_ids_to_tokens(ids)


def test_labels_cover_answers_and_eos_only_in_multi_turn(tiny):
    turns = [("<image>\nwhat is this digit ?", "7"), ("is this 3 ?", "1 2")]
    enc = encode_record(Record(Image.new("RGB", (30, 30)), turns, "r"), tiny.processor)
    assert decode_labels(tiny, enc) == ["7", "</s>", "1", "2", "</s>"]
    assert tiny.processor.tokenizer.convert_ids_to_tokens(enc.answer_ids.tolist()) == ["1", "2", "</s>"]
    assert int((enc.input_ids == tiny.spec.image_token_id).sum()) == tiny.spec.num_image_tokens
    # the question tokens themselves are never labelled
    assert all(t not in decode_labels(tiny, enc) for t in ["what", "is", "this", "digit"])


def test_training_prompt_equals_serving_tokenisation(tiny):
    """input_ids[:prompt_len] is what the processor gives for the same question with a generation prompt."""
    image = Image.new("RGB", (40, 28), (10, 200, 30))
    turns = [("<image>\nwhat is this digit ?", "4")]
    enc = encode_record(Record(image, turns, "r"), tiny.processor)
    prompt = tiny.processor.apply_chat_template(
        to_messages(turns)[:1], tokenize=False, add_generation_prompt=True
    )
    served = tiny.processor(text=[prompt], images=[image], return_tensors="pt")
    assert enc.input_ids[: enc.prompt_len].tolist() == served["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values, served["pixel_values"][0])
    pixels = tiny.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(enc.pixel_values, pixels)


def test_digits_split_is_fixed_disjoint_and_upscaled(tiny):
    train, test = digits_split("train"), digits_split("test")
    assert len(train) == 1297 and len(test) == 500
    assert not set(train.tolist()) & set(test.tolist())
    assert np.array_equal(train, digits_split("train"))
    records = builtin_records("digits", image_size=24, n=3, seed=5)
    assert records[0].image.size == (24, 24) and records[0].turns[0][1].isdigit()
    held_out = builtin_records("digits", image_size=24, n=3, seed=5, evaluation=True)
    assert [r.source for r in held_out] == [f"digits:test[{i}]" for i in test[:3]]


def test_load_data_json_split_is_fixed_and_synthetic_eval_differs(folder, tiny):
    path = write_json(folder, [good(f"{i % 3}.png", answer=str(i % 10)) for i in range(20)])
    opts = DataOptions(str(path), image_folder=str(folder / "imgs"), eval_fraction=0.25, seed=1)
    train, held_out = load_data(opts, tiny.processor, tiny.spec.image_size)
    train2, held_out2 = load_data(
        DataOptions(str(path), image_folder=str(folder / "imgs"), eval_fraction=0.25, seed=9),
        tiny.processor,
        tiny.spec.image_size,
    )
    assert (len(train), len(held_out)) == (15, 5)
    assert [e.source for e in held_out.examples] == [e.source for e in held_out2.examples], (
        "the split must not depend on the seed"
    )
    assert not {e.source for e in train.examples} & {e.source for e in held_out.examples}
    opts = DataOptions("synthetic:color", train_size=6, eval_size=4, seed=3)
    train, held_out = load_data(opts, tiny.processor, tiny.spec.image_size)
    assert (len(train), len(held_out)) == (6, 4)
    assert not any(
        torch.equal(a.pixel_values, b.pixel_values) for a in train.examples for b in held_out.examples
    )


def test_unknown_datasets_fail_clearly(tiny):
    with pytest.raises(DataError, match="unknown synthetic task"):
        load_data(DataOptions("synthetic:juggling"), tiny.processor, tiny.spec.image_size)
    with pytest.raises(DataError, match="expected a LLaVA-format .json"):
        load_data(DataOptions("mnist"), tiny.processor, tiny.spec.image_size)
