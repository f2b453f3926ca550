"""Trainer mechanics on the tiny model: the loss falls, only prompts and projector change, resume is exact,
export -> load -> validate round-trips, and the exported bundle gives the training forward's logits in the
serving path."""

from __future__ import annotations

import pytest
import torch

from m2pt.forward import RowInput, encode_images, prefill
from m2pt.prefix import compute_prefix
from m2pt.prompts import init_prompts
from training.config import ConfigError, TrainConfig
from training.data import DataOptions, collate, load_data
from training.params import PromptModule
from training.trainer import Trainer, train


def config(tmp_path, **overrides):
    values = dict(
        base="unused-when-base-is-passed",
        data="digits",
        out=str(tmp_path / "bundle"),
        name="digits-test",
        train_size=16,
        eval_size=8,
        steps=4,
        batch_size=8,
        lr=1e-2,
        eval_every=2,
        checkpoint_every=0,
        text_prompts=3,
        visual_prompts=2,
        progress=False,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def flat(prompts):
    return prompts.to_flat()


def test_loss_falls_on_a_fixed_batch(tiny):
    train_set, _ = load_data(
        DataOptions("digits", train_size=8, eval_size=1), tiny.processor, tiny.spec.image_size
    )
    batch = collate(train_set.examples)
    tokens = train_set.target_count(list(range(8)))
    base_projector = tiny.model.model.multi_modal_projector.state_dict()
    module = PromptModule(init_prompts(tiny.spec, 4, 4, base_projector, seed=0), tiny.model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = module(batch, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The tiny base is random (its frozen lm_head cannot make confident logits):
    # expect a clear, steady fall, not a loss near 0.
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[5:10]) < sum(losses[:5]), losses


def test_only_prompts_and_projector_change(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cfg = config(tmp_path)
    initial = init_prompts(
        tiny.spec,
        cfg.text_prompts,
        cfg.visual_prompts,
        tiny.model.model.multi_modal_projector.state_dict(),
        seed=cfg.seed,
    )
    result = train(cfg, base=tiny)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen base changed"
    assert all(not p.requires_grad for p in tiny.model.parameters())
    trained, start = flat(result.prompts), flat(initial)
    assert set(trained) == set(start) and any(k.startswith("projector.") for k in trained)
    for key in trained:
        assert not torch.equal(trained[key], start[key]), f"{key} did not change"
    assert len(result.history["loss"]) == 4 and [s for s, _ in result.history["eval"]] == [0, 2, 4]


def test_resume_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    straight = train(config(tmp_path / "a", steps=6, checkpoint_every=3), base=tiny)
    cfg = config(tmp_path / "b", steps=6, checkpoint_every=3)
    original = Trainer.train_step

    def crash_at_step_4(self, step):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, base=tiny)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert not (tmp_path / "b" / "bundle").exists()
    resumed = train(config(tmp_path / "b", steps=6, checkpoint_every=3, resume=True), base=tiny)
    a, b = flat(straight.prompts), flat(resumed.prompts)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max() for k in a)
    assert [s for s, _ in resumed.history["loss"]] == list(range(1, 7))
    assert resumed.history["loss"] == straight.history["loss"]
    with pytest.raises(ConfigError, match="lr: checkpoint 0.01 vs now 0.02"):
        train(config(tmp_path / "b", steps=6, checkpoint_every=3, resume=True, lr=2e-2), base=tiny)


def test_export_load_validate_round_trip(tiny, tmp_path):
    from prompts_store.errors import BundleError
    from prompts_store.format import load_bundle
    from prompts_store.store import BundleStore

    cfg = config(tmp_path, publish_store=str(tmp_path / "store"))
    result = train(cfg, base=tiny)
    loaded = load_bundle(result.bundle_dir, spec=tiny.spec)
    got, want = flat(loaded.prompts), flat(result.prompts)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    manifest = loaded.manifest
    assert (manifest.name, manifest.text_prompts, manifest.visual_prompts, manifest.has_projector) == (
        "digits-test",
        3,
        2,
        True,
    )
    prov = manifest.provenance
    assert prov["dataset"]["train"] == "digits" and prov["steps"] == 4
    assert prov["metrics"]["eval_exact_match"] == result.final_accuracy
    assert prov["config"]["lr"] == 1e-2 and prov["parameters"]["projector"] > 0
    assert (tmp_path / "bundle.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ref = BundleStore(tmp_path / "store").resolve("digits-test")
    assert ref.content_hash == loaded.content_hash
    assert (tmp_path / "store" / f"{ref.label}.curves.png").is_file()
    other = tiny.spec.__class__(
        **{**tiny.spec.to_json(), "projector_shapes": tiny.spec.projector_shapes, "llm_dim": 128}
    )
    with pytest.raises(BundleError):
        load_bundle(result.bundle_dir, spec=other)


def test_exported_bundle_gives_training_logits_in_serving_path(tiny, tmp_path):
    from prompts_store.format import load_bundle

    result = train(config(tmp_path, steps=3), base=tiny)
    train_set, _ = load_data(
        DataOptions("digits", train_size=4, eval_size=1), tiny.processor, tiny.spec.image_size
    )
    batch = collate(train_set.examples)
    with torch.no_grad():
        training_logits = PromptModule(result.prompts, tiny.model).logits(batch)  # [B, T, V]
    loaded = load_bundle(result.bundle_dir, spec=tiny.spec)
    with torch.inference_mode():
        prefix = compute_prefix(tiny.model, loaded.prompts)
        features = encode_images(tiny.model, batch.pixel_values, [prefix] * 4)
        serving, _ = prefill(
            tiny.model,
            [RowInput(ids, features[b], prefix) for b, ids in enumerate(batch.input_ids)],
            all_logits=True,
        )
        base_logits, _ = prefill(
            tiny.model,
            [
                RowInput(ids, encode_images(tiny.model, batch.pixel_values[b : b + 1], [None])[0], None)
                for b, ids in enumerate(batch.input_ids)
            ],
            all_logits=True,
        )
    assert (serving - training_logits).abs().max() <= 1e-5
    assert (serving - base_logits).abs().max() > 1e-3, "the trained bundle must change the logits"
