"""The startup gate refuses what the core does not implement, with a message that names it and lists what is
supported: before any weight is read (config stage), on missing/unexpected weights, on module shapes, and when
the smoke prefill fails. `m2pt bundle validate` and `m2pt train` use the same gate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from m2pt.families.base import UnsupportedModelError
from m2pt.gate import SmokeTestError
from m2pt.loading import load_frozen_llava, spec_from_checkpoint

SUPPORTED = "supported: LlavaForConditionalGeneration"


def small_text(**kw):
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, **kw
    )


def small_vision(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **kw)


def config_llava_onevision(**kw):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**small_vision()), text_config=Qwen2Config(**small_text()), **kw
    )


def config_llava_onevision_plain_anyres():
    return config_llava_onevision(vision_aspect_ratio="anyres")


def config_pixtral():
    from transformers import LlamaConfig, LlavaConfig, PixtralVisionConfig

    return LlavaConfig(
        vision_config=PixtralVisionConfig(**small_vision()), text_config=LlamaConfig(**small_text())
    )


def config_qwen2_vl():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=small_text(), vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2}
    )


def config_gemma3_clip():
    from transformers import CLIPVisionConfig, Gemma3Config, Gemma3TextConfig

    return Gemma3Config(
        text_config=Gemma3TextConfig(**small_text(head_dim=16)),
        vision_config=CLIPVisionConfig(**small_vision()),
    )


def config_mistral3():
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    return Mistral3Config(
        text_config=MistralConfig(**small_text()), vision_config=PixtralVisionConfig(**small_vision())
    )


def config_paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    return PaliGemmaConfig(
        text_config=GemmaConfig(**small_text(head_dim=16)), vision_config=SiglipVisionConfig(**small_vision())
    )


def config_idefics3():
    from transformers import Idefics3Config

    return Idefics3Config(text_config=small_text(), vision_config=small_vision())


def config_causal_lm():
    from transformers import LlamaConfig

    return LlamaConfig(**small_text())


def config_llava_gemma_llm():
    from transformers import CLIPVisionConfig, GemmaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**small_vision()), text_config=GemmaConfig(**small_text())
    )


REFUSED = {
    "llava-onevision-plain-anyres": (
        config_llava_onevision_plain_anyres,
        "vision_aspect_ratio 'anyres' is not anyres_max_<N>",
    ),
    "pixtral": (config_pixtral, "vision tower 'pixtral' is not supported"),
    "qwen2-vl": (config_qwen2_vl, "Qwen2VLForConditionalGeneration (Qwen2-VL"),
    "gemma3-clip-tower": (config_gemma3_clip, "Gemma 3 vision tower 'clip_vision_model' is not supported"),
    "mistral3": (config_mistral3, "Mistral3ForConditionalGeneration (Mistral 3"),
    "paligemma": (config_paligemma, "PaliGemmaForConditionalGeneration (PaliGemma"),
    "idefics3": (config_idefics3, "Idefics3ForConditionalGeneration (Idefics3"),
    "text-only": (config_causal_lm, "LlamaForCausalLM is not a supported model"),
    "llava-gemma-llm": (config_llava_gemma_llm, "language model 'gemma' is not supported"),
}


def write_config(path, config):
    """Only config.json: a gate that tried to read weights would fail with a different error."""
    path.mkdir(parents=True, exist_ok=True)
    if not config.architectures:
        name = type(config).__name__.replace("Config", "ForConditionalGeneration")
        config.architectures = ["LlamaForCausalLM" if name == "LlamaForConditionalGeneration" else name]
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(REFUSED))
def test_unsupported_family_is_refused_from_its_config(family, tmp_path):
    make, expected = REFUSED[family]
    path = write_config(tmp_path / family, make())
    for gate in (lambda: load_frozen_llava(str(path), device="cpu"), lambda: spec_from_checkpoint(str(path))):
        with pytest.raises(UnsupportedModelError) as err:
            gate()
        message = str(err.value)
        assert expected in message and SUPPORTED in message and "siglip_vision_model" in message, message
        assert "LlavaNextForConditionalGeneration" in message and "Gemma3ForConditionalGeneration" in message
        assert "LlavaOnevisionForConditionalGeneration" in message


def test_llava_onevision_passes_the_config_gate(tmp_path):
    """OneVision is served (issue 10 item 4): its config gives a spec without reading any weight."""
    spec = spec_from_checkpoint(str(write_config(tmp_path / "ov", config_llava_onevision())))
    assert spec.family == "llava_onevision" and spec.extras["vision_aspect_ratio"] == "anyres_max_9"


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["X"]}))
    with pytest.raises(UnsupportedModelError) as err:
        load_frozen_llava(str(tmp_path), device="cpu")
    assert "not a model config transformers can read" in str(err.value) and SUPPORTED in str(err.value)


def rewrite_weights(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    save_file(edit(tensors), str(path), metadata={"format": "pt"})


def copy_model(tiny_model_dir, dest):
    import shutil

    return shutil.copytree(tiny_model_dir, dest)


def test_missing_projector_weights_are_refused(tiny_model_dir, tmp_path):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    rewrite_weights(path, lambda t: {k: v for k, v in t.items() if "multi_modal_projector" not in k})
    with pytest.raises(UnsupportedModelError) as err:
        load_frozen_llava(str(path), device="cpu")
    message = str(err.value)
    assert "missing keys: " in message and "multi_modal_projector.linear_1" in message, message
    assert "refusing to serve a partly random model" in message


def test_unexpected_weights_are_refused(tiny_model_dir, tmp_path):
    path = copy_model(tiny_model_dir, tmp_path / "m")
    rewrite_weights(path, lambda t: {**t, "model.image_newline": torch.zeros(64)})
    with pytest.raises(UnsupportedModelError) as err:
        load_frozen_llava(str(path), device="cpu")
    assert "unexpected keys: model.image_newline" in str(err.value), str(err.value)


def test_smoke_prefill_failure_is_refused(tiny_model_dir, tmp_path):
    """A processor whose patch size does not match the tower expands `<image>` to the wrong count: the model
    loads fine, and only the smoke prefill catches it."""
    path = copy_model(tiny_model_dir, tmp_path / "m")
    cfg_path = path / "processor_config.json"
    processor_cfg = json.loads(cfg_path.read_text())
    processor_cfg["patch_size"] = 4
    cfg_path.write_text(json.dumps(processor_cfg))
    with pytest.raises(SmokeTestError) as err:
        load_frozen_llava(str(path), device="cpu")
    assert "startup smoke prefill failed" in str(err.value) and "image placeholder tokens" in str(err.value)


def test_module_shape_check_names_the_module(tiny):
    """A k_proj narrower than the config's heads × head_dim is refused with the module's name."""
    import copy

    model = copy.deepcopy(tiny.model)
    model.model.language_model.layers[0].self_attn.k_proj = torch.nn.Linear(64, 8)
    with pytest.raises(UnsupportedModelError) as err:
        tiny.family.check_modules(model, "m")
    assert "LLM layer 0.self_attn.k_proj gives 8 features, expected 2 heads x 16" in str(err.value)


def test_bundle_validate_and_train_use_the_gate(tmp_path, capsys):
    path = write_config(tmp_path / "qwen2vl", config_qwen2_vl())
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "prompts_store.cli", "validate", str(bundle_dir), "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "Qwen2VLForConditionalGeneration (Qwen2-VL" in done.stderr and "[unsupported_model]" in done.stderr
    from training.cli import main

    out = tmp_path / "run"
    code = main(["--base", str(path), "--data", "digits", "--out", str(out), "--steps", "1"])
    assert code == 2
    assert "Qwen2VLForConditionalGeneration (Qwen2-VL" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
