"""LLaVA-NeXT through `m2pt train`: the base stays bit-identical, and the exported bundle gives the training logits
in the serving path (any-res tiles, per-image inputs from `family.split_images`)."""

import torch
from test_train_mechanics import config

from m2pt.forward import RowInput


def test_next_training_parity(tmp_path):
    from m2pt.loading import load_frozen_llava
    from prompts_store.format import load_bundle
    from training.data import DataOptions, collate, load_data
    from training.params import PromptModule
    from training.tiny import build_tiny_llava, next_cfg
    from training.trainer import train

    nxt = load_frozen_llava(str(build_tiny_llava(tmp_path / "m", next_cfg())), device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in nxt.model.state_dict().items()}
    result = train(config(tmp_path, steps=3), base=nxt)
    assert all(torch.equal(before[k], v) for k, v in nxt.model.state_dict().items())
    train_set, _ = load_data(
        DataOptions("digits", train_size=4, eval_size=1),
        nxt.processor,
        nxt.spec.image_size,
        nxt.family.split_images,
    )
    batch = collate(train_set.examples)
    with torch.no_grad():
        training_logits = PromptModule(result.prompts, nxt.model).logits(batch)
    loaded = load_bundle(result.bundle_dir, spec=nxt.spec)
    with torch.inference_mode():
        prefix = nxt.family.compute_prefix(nxt.model, loaded.prompts)
        rows = []
        for b, ids in enumerate(batch.input_ids):
            ims = list(batch.images[b])
            feats = torch.cat(nxt.family.encode_images(nxt.model, ims, [prefix] * len(ims)))
            rows.append(RowInput(ids, feats, prefix, ims))
        serving, _ = nxt.family.prefill(nxt.model, rows, all_logits=True)
    assert (serving - training_logits).abs().max() <= 1e-5
