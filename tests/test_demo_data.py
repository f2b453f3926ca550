"""The demo batch builder: the fast token path equals the processor's ids; labels cover answers only."""

from __future__ import annotations

import random

import pytest
import torch

from training.demo.base import DemoRecipe, demo_model_config, lr_factor
from training.demo.data import (
    IGNORE_INDEX,
    PromptEncoder,
    augment_unknown,
    chat_prompt,
    collate,
    filler_token_ids,
    processor_prompt_ids,
    sequence_loss_and_hits,
)
from training.demo.synthetic import HELD_OUT_TASKS, TASKS, make_examples
from training.tiny import EOS_ID, IMAGE_ID, PAD_ID, UNK_ID, build_processor, build_tokenizer


@pytest.fixture(scope="module")
def processor():
    cfg = demo_model_config()
    return build_processor(cfg, build_tokenizer(cfg.vocabulary()))


@pytest.fixture(scope="module")
def encoder(processor):
    return PromptEncoder(processor.tokenizer, num_image_tokens=10)


def test_fast_prompt_ids_equal_the_processor_chat_template_ids(processor, encoder):
    examples = make_examples(list(TASKS) + list(HELD_OUT_TASKS), 8, seed=11)
    for ex in examples:
        assert encoder.prompt_ids(ex.question) == processor_prompt_ids(processor, ex.question, ex.image), (
            ex.question
        )
    ids = encoder.prompt_ids("What color is the shape?")
    assert ids.count(IMAGE_ID) == 10 and UNK_ID not in ids


def test_answer_ids_match_an_assistant_turn_of_the_chat_template(processor, encoder):
    for ex in make_examples(list(TASKS), 3, seed=12):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]},
        ]
        text = processor.apply_chat_template(messages)
        full = [int(t) for t in processor(text=text, images=ex.image)["input_ids"][0]]
        assert full == encoder.prompt_ids(ex.question) + encoder.answer_ids(ex.answer)
        assert encoder.answer_ids(ex.answer)[-1] == EOS_ID


def test_unknown_words_become_unk(processor, encoder):
    ids = encoder.prompt_ids("What colour is the zebra?")
    assert ids.count(UNK_ID) == 1
    assert chat_prompt(processor, "hi").endswith("assistant :")


def test_collate_labels_only_the_answer_and_pads_on_the_right(processor, encoder):
    examples = make_examples(["where", "count"], 2, seed=13)
    batch = collate(examples, encoder, processor.image_processor)
    assert batch.pixel_values.shape == (4, 3, 24, 24)
    for row, ex in enumerate(examples):
        prompt = encoder.prompt_ids(ex.question)
        answer = encoder.answer_ids(ex.answer)
        n = len(prompt) + len(answer)
        assert batch.input_ids[row, :n].tolist() == prompt + answer
        assert batch.labels[row, len(prompt) : n].tolist() == answer
        assert (batch.labels[row, : len(prompt)] == IGNORE_INDEX).all() and (
            batch.labels[row, n:] == IGNORE_INDEX
        ).all()
        assert (batch.input_ids[row, n:] == PAD_ID).all() and batch.attention_mask[row].sum() == n


def test_augment_unknown_swaps_a_filler_and_inserts_one_unk(processor, encoder):
    fillers = filler_token_ids(processor.tokenizer)
    ids = encoder.question_ids("what color is the object ?")
    assert augment_unknown(ids, fillers, random.Random(0), prob=0.0) == ids
    out = augment_unknown(ids, fillers, random.Random(0), prob=1.0)
    assert len(out) == len(ids) + 1 and out.count(UNK_ID) == 2
    assert not fillers & set(out)
    no_filler = encoder.question_ids("what color is the shape ?")
    assert augment_unknown(no_filler, fillers, random.Random(0), prob=1.0).count(UNK_ID) == 1


def test_teacher_forced_hits_mean_every_answer_token_is_argmax():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 2], [IGNORE_INDEX, IGNORE_INDEX, 5, 2]])
    logits = torch.zeros(2, 4, 8)  # [B, T, V]; position t predicts labels[t + 1]
    logits[:, 1, 5] = 10.0
    logits[0, 2, 2] = 10.0
    logits[1, 2, 3] = 10.0
    loss, hits = sequence_loss_and_hits(logits, labels)
    assert hits.tolist() == [True, False]
    assert float(loss) > 0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    recipe = DemoRecipe(steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, recipe) == pytest.approx(0.01)
    assert lr_factor(99, recipe) == pytest.approx(1.0)
    assert lr_factor(550, recipe) == pytest.approx(0.55)
    assert lr_factor(1000, recipe) == pytest.approx(0.1)
