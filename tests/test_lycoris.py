"""LyCORIS files, written by the LyCORIS library itself (lycoris-lora, kohya layout ``lora_unet_...`` /
``lora_te_...`` as sd-scripts and LyCORIS save them for A1111 and ComfyUI), imported into the registry
and applied by the studio: each changes the UNet's and the text encoder's outputs exactly as LyCORIS's
own forward does, at full and at half strength (DoRA: at full strength; below it, peft's convention)."""

from __future__ import annotations

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris
from safetensors.torch import load_file, save_file

from adapters.compose import AdapterEngine, AdapterSpec, resolve_adapter
from adapters.ingest import import_adapter
from studio.core.base_models import load_fresh_pipeline
from studio.core.errors import UnsupportedAdapterError

# name -> (LyCORIS algo, options): each layout LyCORIS writes for these methods
CASES = {
    "locon": ("lora", {}),
    "locon-tucker": ("lora", {"use_tucker": True}),  # lora_mid: a CP-decomposed kernel
    "full": ("full", {}),  # diff / diff_b: the whole update of each layer
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {}),
    "lokr-decomposed": ("lokr", {"linear_dim": 2, "decompose_both": True}),
    "lokr-tucker": ("lokr", {"linear_dim": 2, "use_tucker": True}),
    "lokr-full": ("lokr", {"linear_dim": 64}),
}
TOL = 2e-5  # of the output's scale: float32 sums in another order (W x + dW x, or (W + dW) x fused)


def _network(module, prefix: str, algo: str, options: dict, seed: int):
    LycorisNetwork.apply_preset({"lora_prefix": prefix})
    options = {"linear_dim": 4, "linear_alpha": 2, **options}
    net = create_lycoris(module, 1.0, options.pop("linear_dim"), options.pop("linear_alpha"), algo=algo, **options)
    net.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # LyCORIS starts at zero effect: random factors make every part count
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return net


def _outputs(pipe, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    ids, x, t, context = inputs
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(x, t, context).sample


@pytest.fixture(scope="module")
def inputs():
    import json

    from studio.core.embedded import TINY_MODEL_DIR

    width = json.loads((TINY_MODEL_DIR / "unet" / "config.json").read_text())["cross_attention_dim"]
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 1000, (1, 77), generator=g), torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500]),
            torch.randn(1, 77, width, generator=g))


def _lycoris_file(tmp_path, algo, options, strength_inputs):
    """The file LyCORIS saves for networks on the UNet and the text encoder, and what LyCORIS's forward
    gives at multipliers 1 and 0.5."""
    pipe = load_fresh_pipeline("tiny")
    nets = [_network(pipe.unet, "lora_unet", algo, dict(options), 0),
            _network(pipe.text_encoder, "lora_te", algo, dict(options), 1)]
    theirs = {}
    for multiplier in (1.0, 0.5):
        for net in nets:
            net.multiplier = multiplier
            for lora in net.loras:
                lora.multiplier = multiplier
        theirs[multiplier] = _outputs(pipe, strength_inputs)
    return _save_networks(nets, tmp_path / f"{algo}.safetensors")[0], theirs


def _save_networks(nets, path):
    """One file of the networks' tensors, as LyCORIS saves each; returns (path, tensors)."""
    state = {}
    for i, net in enumerate(nets):
        part = path.with_name(f"{path.stem}-part{i}.safetensors")
        net.save_weights(str(part), torch.float32, None)
        state.update(load_file(str(part)))
    save_file(state, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path, state


# The default suite runs one case of each conversion kind; `scripts/test -m slow` runs every layout.
DEFAULT_CASES = ("loha", "lokr-decomposed", "full")


@pytest.mark.parametrize("case", [c if c in DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_a_lycoris_file_imports_and_applies_as_lycoris_applies_it(case, tmp_path, reg, inputs):
    algo, options = CASES[case]
    path, theirs = _lycoris_file(tmp_path, algo, options, inputs)
    version = import_adapter(reg, path, name=f"lyco-{case}")
    assert version.adapter_type == {"lora": "lora", "full": "lora", "loha": "loha", "lokr": "lokr"}[algo]
    assert set(version.components) == {"unet", "text_encoder"}
    pipe = load_fresh_pipeline("tiny")
    base = _outputs(pipe, inputs)
    engine = AdapterEngine(pipe)
    resolved = [resolve_adapter(version.ref)]
    for weight in (1.0, 1.0, 0.5):  # the second use of a stack is fused into the weights where peft can
        engine.apply([AdapterSpec(version.ref, weight)], resolved)
        ours = _outputs(pipe, inputs)
        for o, t, b in zip(ours, theirs[weight], base, strict=True):
            assert (t - b).abs().max() > 0.01  # LyCORIS changed this output
            scale = max(1.0, float(t.abs().max()))  # a full update of every layer moves outputs to ~6
            assert (o - t).abs().max() <= TOL * scale, (case, weight, float((o - t).abs().max()))


def test_a_lokr_split_peft_cannot_rebuild_is_refused_by_name(tmp_path, reg, inputs):
    # factor 4 on conv_in's 4 channels: LyCORIS splits them (1, 4), peft's rule (4, 1)
    path, _ = _lycoris_file(tmp_path, "lokr", {"factor": 4}, inputs)
    with pytest.raises(UnsupportedAdapterError, match="peft cannot rebuild .*conv_in.*A1111 and ComfyUI load it"):
        import_adapter(reg, path, name="lyco-factor4")
    assert reg.list_versions(limit=None).total == 0


@pytest.mark.parametrize(("algo", "options", "named"), [
    pytest.param("diag-oft", {}, "OFT", marks=pytest.mark.slow), ("boft", {}, "OFT / BOFT"),
    pytest.param("glora", {}, "GLoRA", marks=pytest.mark.slow),
    pytest.param("ia3", {}, r"\(IA\)\^3", marks=pytest.mark.slow),
    pytest.param("loha", {"dora_wd": True}, "LoHa with weight decomposition", marks=pytest.mark.slow),
])
def test_algorithms_peft_cannot_hold_are_refused_by_name(algo, options, named, tmp_path, reg, inputs):
    path, _ = _lycoris_file(tmp_path, algo, options, inputs)
    with pytest.raises(UnsupportedAdapterError, match=f"{named}.*A1111.*ComfyUI"):
        import_adapter(reg, path, name=f"lyco-{algo}")


def _peft_dora_at(weight, dora_scale, delta, strength):
    """peft's DoRA at ``strength``: the magnitude times W + s dW normalised per output row."""
    merged = weight + strength * delta
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    return merged * dora_scale.reshape(norm.shape) / norm


def test_a_lycoris_dora_file_imports_as_peft_dora_and_applies_as_lycoris_applies_it(tmp_path, reg, inputs):
    path, theirs = _lycoris_file(tmp_path, "lora", {"dora_wd": True}, inputs)
    assert any(k.endswith(".dora_scale") for k in load_file(str(path)))
    version = import_adapter(reg, path, name="lyco-dora")
    assert version.adapter_type == "dora" and set(version.components) == {"unet", "text_encoder"}
    pipe = load_fresh_pipeline("tiny")
    base = _outputs(pipe, inputs)
    engine = AdapterEngine(pipe)
    resolved = [resolve_adapter(version.ref)]
    for _ in range(2):  # loaded, then the repeated request fused
        engine.apply([AdapterSpec(version.ref, 1.0)], resolved)
        for o, t, b in zip(_outputs(pipe, inputs), theirs[1.0], base, strict=True):
            assert (t - b).abs().max() > 0.01
            assert (o - t).abs().max() <= TOL * max(1.0, float(t.abs().max())), float((o - t).abs().max())
    # Below strength 1 the conventions part: LyCORIS 4.1 blends the magnitude only (W + dW stays whole),
    # A1111 and ComfyUI blend the whole weight, peft (what the studio applies) scales the direction.
    engine.apply([AdapterSpec(version.ref, 0.5)], resolved)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    state = load_file(str(path))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
    delta = up @ down * (float(state[f"{stem}.alpha"]) / down.shape[0])
    x = torch.randn(3, down.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = layer(x)
    expected = x @ _peft_dora_at(layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight,
                                 state[f"{stem}.dora_scale"], delta, 0.5).T
    assert (ours - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


@pytest.mark.slow  # the bad-file corpus holds a hand-made one for the default suite
def test_a_dora_normalised_per_input_channel_is_refused_by_name(tmp_path, reg, inputs):
    path, _ = _lycoris_file(tmp_path, "lora", {"dora_wd": True, "wd_on_output": False}, inputs)
    with pytest.raises(UnsupportedAdapterError, match="magnitude per input channel.*A1111 and ComfyUI load it"):
        import_adapter(reg, path, name="lyco-dora-in")
    assert reg.list_versions(limit=None).total == 0


# SDXL: the UNet and both text encoders (kohya's lora_te1_ / lora_te2_), one case of each method here;
# `scripts/test -m slow` runs the rest.
SDXL_CASES = {"loha": ("loha", {}), "locon-tucker": ("lora", {"use_tucker": True}),
              "lokr-decomposed": ("lokr", {"linear_dim": 2, "decompose_both": True}),
              "dora": ("lora", {"dora_wd": True})}


def _sdxl_outputs(pipe, inputs) -> tuple[torch.Tensor, ...]:
    ids, x, t, context, added = inputs
    with torch.no_grad():
        return (pipe.text_encoder(ids).last_hidden_state, pipe.text_encoder_2(ids).last_hidden_state,
                pipe.unet(x, t, context, added_cond_kwargs=added).sample)


@pytest.mark.parametrize("case", [c if c == "loha" else pytest.param(c, marks=pytest.mark.slow) for c in SDXL_CASES])
def test_a_lycoris_file_on_sdxl_imports_and_applies_as_lycoris_applies_it(case, tmp_path, reg):
    import json

    from studio.core.embedded import EMBEDDED_DIR

    config = json.loads((EMBEDDED_DIR / "tiny-sdxl" / "unet" / "config.json").read_text())
    g = torch.Generator().manual_seed(3)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = (torch.randint(0, 1000, (1, 77), generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
              torch.randn(1, 77, config["cross_attention_dim"], generator=g),
              {"text_embeds": torch.randn(1, pooled, generator=g),
               "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])})
    algo, options = SDXL_CASES[case]
    pipe = load_fresh_pipeline("tiny-sdxl")
    nets = [_network(pipe.unet, "lora_unet", algo, dict(options), 0),
            _network(pipe.text_encoder, "lora_te1", algo, dict(options), 1),
            _network(pipe.text_encoder_2, "lora_te2", algo, dict(options), 2)]
    theirs = _sdxl_outputs(pipe, inputs)
    path, state = _save_networks(nets, tmp_path / f"sdxl-{case}.safetensors")

    version = import_adapter(reg, path, name=f"xl-{case}", base="tiny-sdxl")
    assert version.family == "sdxl" and set(version.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert version.metrics["applies_to"]["modules"] == len({k.rsplit(".", 1)[0] for k in state if ".alpha" in k})
    pipe = load_fresh_pipeline("tiny-sdxl")
    base = _sdxl_outputs(pipe, inputs)
    AdapterEngine(pipe).apply([AdapterSpec(version.ref, 1.0)], [resolve_adapter(version.ref)])
    for o, t, b in zip(_sdxl_outputs(pipe, inputs), theirs, base, strict=True):
        assert (t - b).abs().max() > 0.01
        assert (o - t).abs().max() <= TOL * max(1.0, float(t.abs().max())), (case, float((o - t).abs().max()))
