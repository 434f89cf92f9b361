"""Families and architectures: recognition from adapter keys, single files and pipeline classes; the
kohya prefixes; the SD-1 family's conditioning hook against the pipeline's own prompt encoding; the
single-file layouts the families describe."""

from __future__ import annotations

import json

import pytest

from studio.core.base_models import load_fresh_pipeline
from studio.core.errors import InvalidRequestError
from studio.core.families import (
    FAMILIES,
    architecture_of,
    architectures,
    family_for_pipeline_class,
    family_of_pipeline,
    get_family,
    kohya_prefixes,
)
from studio.core.single_file import CONVERTERS, MODEL_CONFIG_FILE, SCHEDULER_CONFIG_FILE

# ---- adapters: key sets shaped like real files --------------------------------------------------

DOWN = ".lora_down.weight"
KOHYA_SDXL = [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" + DOWN,
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v" + DOWN,
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" + DOWN,
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" + DOWN,
]
# kohya's Flux LoRAs name the original (BFL) blocks; diffusers' name the transformer's.
KOHYA_FLUX = ["lora_unet_double_blocks_0_img_attn_proj" + DOWN, "lora_unet_single_blocks_3_linear1" + DOWN]
DIFFUSERS_FLUX = ["transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight",
                  "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
KOHYA_SD3 = ["lora_unet_joint_blocks_0_context_block_attn_qkv" + DOWN,
             "lora_unet_joint_blocks_0_x_block_mlp_fc1" + DOWN]
# diffusers' SD3 keys say "a transformer" and no more: SD3 and Flux share the words.
DIFFUSERS_SD3 = ["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
# SD-1 and SD-2 files have the same key names: only the widths tell them apart.
KOHYA_SD = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" + DOWN,
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj" + DOWN]
CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("keys, arch, evidence", [
    (KOHYA_SDXL, "sdxl", "lora_te2_"),
    (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight",
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"], "sdxl", "text_encoder_2."),
    (KOHYA_FLUX, "flux", "double_blocks"),
    (DIFFUSERS_FLUX, "flux", "single_transformer_blocks"),
    (KOHYA_SD3, "sd3", "joint_blocks"),
    (DIFFUSERS_SD3, "dit", "transformer."),
])
def test_recognise_lora_by_keys(keys, arch, evidence):
    name, why = architectures.recognise_lora(keys)
    assert name == arch
    assert evidence in why


def test_recognise_lora_sd1_and_sd2_by_widths():
    # The key names alone do not tell SD-1 from SD-2.
    assert architectures.recognise_lora(KOHYA_SD) == (None, "")
    assert architectures.recognise_lora(KOHYA_SD, [("unet", CROSS, 768)]) == ("sd1", "cross-attention dim 768")
    assert architectures.recognise_lora(KOHYA_SD, [("unet", CROSS, 1024)]) == ("sd2", "cross-attention dim 1024")
    assert architectures.recognise_lora(KOHYA_SD, [("text_encoder", TE_Q, 768)]) == ("sd1", "text encoder width 768")
    assert architectures.recognise_lora(KOHYA_SD, [("text_encoder", TE_Q, 1024)])[0] == "sd2"
    # Self-attention (attn1) reads the image features, not the text: its width names nothing.
    assert architectures.recognise_lora(KOHYA_SD, [("unet", CROSS.replace("attn2", "attn1"), 768)]) == (None, "")
    # A width no architecture has is not guessed at.
    assert architectures.recognise_lora(KOHYA_SD, [("unet", CROSS, 640)]) == (None, "")
    # SD-1 and SD-2 share a module tree; SDXL's is another.
    assert not architectures.other_tree("sd2", "sd1") and architectures.other_tree("sdxl", "sd1")


@pytest.mark.parametrize("key, arch", [
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "sd1"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "sd2"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
    ("double_blocks.0.img_attn.qkv.weight", "flux"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux"),
])
def test_recognise_single_file(key, arch):
    # Every full checkpoint also holds a UNet/VAE under LDM names that say nothing on their own.
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight", key]
    name, why = architectures.recognise_single_file(keys)
    assert name == arch and key in why


def test_unknown_single_files_are_not_guessed():
    assert architectures.recognise_single_file(["model.diffusion_model.input_blocks.0.0.weight"]) == (None, "")
    assert architectures.recognise_single_file(KOHYA_SDXL) == (None, "")
    assert architectures.recognise_single_file([]) == (None, "")


def test_recognise_pipeline_class():
    assert architectures.recognise_pipeline_class("StableDiffusionPipeline") is architectures.SD1
    assert architectures.recognise_pipeline_class("StableDiffusionImg2ImgPipeline") is architectures.SD1
    assert architectures.recognise_pipeline_class("StableDiffusionXLPipeline") is architectures.SDXL
    assert architectures.recognise_pipeline_class("StableDiffusion3Pipeline") is architectures.SD3
    assert architectures.recognise_pipeline_class("FluxPipeline") is architectures.FLUX
    assert architectures.recognise_pipeline_class("KandinskyV22Pipeline") is None
    assert architectures.display_name("sdxl") == "SDXL" and architectures.display_name(None) is None


# ---- kohya prefixes --------------------------------------------------------------------------


def test_kohya_prefixes_cover_every_known_layout():
    prefixes = kohya_prefixes()
    assert prefixes["lora_unet_"] == "unet"
    assert prefixes["lora_te_"] == prefixes["lora_te1_"] == "text_encoder"
    assert prefixes["lora_te2_"] == "text_encoder_2"
    assert prefixes["lora_te3_"] == "text_encoder_3"
    assert prefixes["lora_transformer_"] == "transformer"
    assert set(prefixes.values()) <= set(architectures.COMPONENTS)


def test_family_kohya_prefix():
    sd1 = get_family("sd1")
    assert sd1.kohya_prefix("unet") == "lora_unet_"
    assert sd1.kohya_prefix("text_encoder") == "lora_te_"  # what the studio writes; lora_te1_ is read too
    assert sd1.kohya_prefix_map() == {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
    with pytest.raises(KeyError, match="text_encoder_2"):
        sd1.kohya_prefix("text_encoder_2")
    assert sd1.lora_components == ("unet", "text_encoder") and sd1.denoiser == "unet"
    for family in FAMILIES.values():
        for component in family.lora_components:
            # a family's files are read with its own table (FLUX's lora_unet_ is its transformer)
            assert family.kohya_prefix_map()[family.kohya_prefix(component)] == component
    assert get_family("flux").kohya_prefix_map()["lora_unet_"] == "transformer"
    assert get_family("flux").kohya_prefix_map()["lora_te3_"] == "text_encoder_2"


# ---- families and loaded pipelines -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_fresh_pipeline("tiny")


def test_family_of_pipeline(tiny):
    from diffusers import StableDiffusionImg2ImgPipeline

    sd1 = get_family("sd1")
    assert family_of_pipeline(tiny) is sd1
    assert family_of_pipeline(StableDiffusionImg2ImgPipeline.from_pipe(tiny)) is sd1
    assert family_for_pipeline_class("StableDiffusionInpaintPipeline") is sd1
    assert architecture_of(sd1) is architectures.SD1 and architecture_of("sd1") is architectures.SD1
    with pytest.raises(InvalidRequestError, match="not a pipeline of a supported family"):
        family_of_pipeline(object())


def test_conditioning_hook_matches_the_pipelines_own_encoding(tiny):
    import torch

    family = family_of_pipeline(tiny)
    prompts = ["a red circle on a blue background", "two green squares", ""]
    with torch.no_grad():
        got = family.conditioning(tiny.components, prompts)
        want, _ = tiny.encode_prompt(prompts, device=tiny.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
    assert set(got) == {"encoder_hidden_states"}
    assert got["encoder_hidden_states"].shape[0] == len(prompts)
    assert torch.equal(got["encoder_hidden_states"], want)
    # Rows are per prompt: one prompt alone conditions exactly as it does in a batch.
    with torch.no_grad():
        alone = family.conditioning(tiny.components, prompts[1:2])
    assert torch.allclose(alone["encoder_hidden_states"][0], want[1], atol=1e-6)


def test_predict_calls_the_denoiser_as_the_pipeline_does(tiny):
    import torch

    family = family_of_pipeline(tiny)
    denoiser = getattr(tiny, family.denoiser)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, denoiser.config.in_channels, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        conditioning = family.conditioning(tiny.components, ["a", "b"])
        out = family.predict(denoiser, latents, timesteps, conditioning)
        want = denoiser(latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample
    assert torch.equal(out, want)


# ---- single-file layouts -------------------------------------------------------------------------


@pytest.mark.parametrize("family", [f for f in FAMILIES.values() if f.single_file is not None], ids=lambda f: f.name)
def test_single_file_layouts_are_complete(family):
    layout = family.single_file
    assert family.single_file_config_dir == layout.config_dir
    index = json.loads((layout.config_dir / "model_index.json").read_text())
    assert index["_class_name"] in family.pipeline_class_names
    for part in layout.components:
        assert part.converter in CONVERTERS, part
        assert index[part.component] == [part.library, part.class_name]
        config = json.loads((layout.config_dir / part.component / MODEL_CONFIG_FILE).read_text())
        if part.library == "transformers":
            assert config["model_type"] == part.model_type
        else:
            assert config["_class_name"] == part.class_name
    assert (layout.config_dir / layout.scheduler / SCHEDULER_CONFIG_FILE).is_file()
    for name, folder in layout.tokenizers.items():
        assert index[name][0] == "transformers" and folder.is_dir()
    # What the studio writes in this layout is recognised as this family when read back.
    assert architectures.recognise_single_file([p.prefix + "w" for p in layout.components])[0] == family.name


def test_sd1_single_file_format_name_is_stable():
    # Files the studio exported carry this name: changing it would orphan them.
    assert get_family("sd1").single_file.format == "sd1-ldm-single-file"
