"""Training parity on tiny Qwen2.5-VL / Qwen3-VL: data is tokenised as serving tokenises it, a few trainer steps
change only prompts + projector, the bundle round-trips through the store format, and the exported bundle gives the
training forward's logits in the serving path."""

from __future__ import annotations

import pytest
import torch
from qwen_helpers import FAMILIES, load_tiny_qwen

from m2pt.forward import RowInput
from training.config import TrainConfig
from training.data import DataOptions, collate, load_data
from training.params import PromptModule
from training.trainer import train


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, tmp_path_factory):
    return load_tiny_qwen(tmp_path_factory, request.param)[1]


def config(tmp_path, **overrides):
    values = dict(
        base="unused-when-base-is-passed",
        data="digits",
        out=str(tmp_path / "bundle"),
        name="qwen-digits",
        train_size=8,
        eval_size=4,
        steps=3,
        batch_size=4,
        lr=1e-2,
        eval_every=3,
        checkpoint_every=0,
        text_prompts=3,
        visual_prompts=2,
        progress=False,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def digits(frozen, n):
    opts = DataOptions("digits", train_size=n, eval_size=1)
    return load_data(opts, frozen.processor, frozen.spec.image_size, frozen.family.split_images)[0]


def test_examples_are_tokenised_as_serving_tokenises_them(qwen):
    from training.builtin import builtin_records
    from training.data import encode_record, to_messages

    record = builtin_records("digits", qwen.spec.image_size, 1, 0, evaluation=False)[0]
    example = encode_record(record, qwen.processor, qwen.family.split_images)
    (image,) = example.images
    messages = to_messages(record.turns)[:1]  # the user turn, as the server renders a request
    text = qwen.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    served = qwen.processor(images=[record.image], text=[text], return_tensors="pt")
    assert torch.equal(example.input_ids[: example.prompt_len], served["input_ids"][0])
    assert torch.equal(image.pixel_values, served["pixel_values"])
    assert image.pixel_values.ndim == 2 and image.extras["image_grid_thw"].shape == (3,)
    prompt = example.input_ids[: example.prompt_len]
    image_tokens = int((prompt == qwen.model.config.image_token_id).sum())
    assert image_tokens == int(image.extras["image_grid_thw"].prod()) // 4  # 2x2 merge
    assert int(example.answer_ids[-1]) == qwen.processor.tokenizer.eos_token_id  # <|im_end|> is learned


def test_trainer_steps_change_only_prompts_and_projector(qwen, tmp_path):
    from prompts_store.format import load_bundle

    before = {k: v.clone() for k, v in qwen.model.state_dict().items()}
    result = train(config(tmp_path), base=qwen)
    assert all(torch.equal(before[k], v) for k, v in qwen.model.state_dict().items()), (
        "the frozen base changed"
    )
    losses = [loss for _, loss in result.history["loss"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    loaded = load_bundle(result.bundle_dir, spec=qwen.spec)
    got, want = loaded.prompts.to_flat(), result.prompts.to_flat()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert {"text_prompts", "visual_prompts"} <= set(got) and any(
        k.startswith("projector.merger.") for k in got
    )
    base_projector = qwen.family.projector(qwen.model).state_dict()
    for key, value in got.items():
        if key.startswith("projector."):
            assert not torch.equal(value, base_projector[key[len("projector.") :]]), f"{key} did not train"


def test_exported_bundle_gives_training_logits_in_serving_path(qwen, tmp_path):
    from prompts_store.format import load_bundle

    result = train(config(tmp_path, steps=2), base=qwen)
    batch = collate(digits(qwen, 4).examples)
    assert batch.pixel_values is None and len(batch.images) == 4  # Qwen layout: per-example ImageInputs
    with torch.no_grad():
        training_logits = PromptModule(result.prompts, qwen.model).logits(batch)  # [B, T, V]
    family, model = qwen.family, qwen.model
    loaded = load_bundle(result.bundle_dir, spec=qwen.spec)
    with torch.inference_mode():
        out = {}
        for name, prefix in (("served", family.compute_prefix(model, loaded.prompts)), ("base", None)):
            rows = []
            for ids, images in zip(batch.input_ids, batch.images, strict=True):
                feats = family.encode_images(model, images, [prefix] * len(images))
                rows.append(RowInput(ids, torch.cat(feats), prefix, tuple(images)))
            out[name], _ = family.prefill(model, rows, all_logits=True)
    assert (out["served"] - training_logits).abs().max() <= 1e-5
    assert (out["served"] - out["base"]).abs().max() > 1e-3, "the trained bundle must change the logits"
