"""The bad-file corpus: small files that adapter import must refuse, each with a clear error.

Holds :data:`CORPUS` (file name -> (error class name, words the message must contain)) and
:func:`build_corpus`, which writes every file into a folder in well under a second. Nothing here is
committed as binary: ``tests/test_formats.py`` builds the corpus into ``tmp_path``; run this file to
get a copy to look at::

    python tests/bad_files/make_corpus.py /tmp/bad_loras

Shapes follow the embedded tiny SD-1 model (inner width 64, cross-attention 64) unless a file is
meant to look like another model: SD-1.5 (cross-attention 768, first block 320 wide), SDXL (2048),
Flux, SD3. Malformed safetensors are written byte by byte, since no library writes them.
"""

from __future__ import annotations

import json
import pickle
import struct
import sys
from pathlib import Path

TINY_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear(64, 64) in the tiny UNet
TINY_K2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear(64 = cross-attention dim, 64)

# name -> (error class, fragments the message must contain, case-insensitive)
CORPUS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pickle.ckpt": ("UnsafeWeightsError", ("pickle", "convert")),
    "pickle_renamed.safetensors": ("UnsafeWeightsError", ("pickle (protocol 4)", "safetensors only")),
    "torch_zip.safetensors": ("UnsafeWeightsError", ("zip", "torch.save")),
    "empty.safetensors": ("CorruptWeightsError", ("only 0 bytes",)),
    "truncated.safetensors": ("CorruptWeightsError", ("truncated",)),
    "oversized_header.safetensors": ("CorruptWeightsError", ("header length 1000000000", "does not fit")),
    "not_json.safetensors": ("CorruptWeightsError", ("not json",)),
    "overlapping.safetensors": ("CorruptWeightsError", ("overlaps",)),
    "wrong_size.safetensors": ("CorruptWeightsError", ("needs 64 bytes", "give 32")),
    "bad_metadata.safetensors": ("CorruptWeightsError", ("__metadata__",)),
    "no_tensors.safetensors": ("UnsupportedAdapterError", ("no tensors",)),
    "full_checkpoint.safetensors": ("UnsupportedAdapterError", ("full model checkpoint",)),
    "unknown_keys.safetensors": ("UnsupportedAdapterError", ("not adapter tensors", "unet.extra.weight")),
    "mixed_layouts.safetensors": ("UnsupportedAdapterError", ("mixes kohya keys",)),
    "kohya_dora.safetensors": ("UnsupportedAdapterError", ("magnitude per input channel", "dora_scale")),
    "lycoris_loha_dora.safetensors": ("UnsupportedAdapterError", ("lycoris loha with weight decomposition", "peft")),
    "incomplete.safetensors": ("CorruptWeightsError", ("lacks lora_b",)),
    "rank_mismatch.safetensors": ("CorruptWeightsError", ("share a rank",)),
    "nan.safetensors": ("CorruptWeightsError", ("nan",)),
    "sdxl_kohya.safetensors": ("IncompatibleAdapterError", ("sdxl", "second text encoder")),
    "sdxl_shapes.safetensors": ("IncompatibleAdapterError", ("made for sdxl", "cross-attention dim 2048")),
    "sd2_shapes.safetensors": ("IncompatibleAdapterError", ("cross-attention dim 1024 (sd-2.x)",)),
    "flux.safetensors": ("IncompatibleAdapterError", ("flux",)),
    "sd3.safetensors": ("IncompatibleAdapterError", ("sd3", "joint")),
    "sd15_on_tiny.safetensors": ("IncompatibleAdapterError",
                                 ("this lora was made for a model with cross-attention dim 768 (sd-1.x); "
                                  "the base 'tiny' has 64",)),
    "sd15_text_encoder.safetensors": ("IncompatibleAdapterError", ("text encoder of width 768 (sd-1.x)",)),
    "zero_matching.safetensors": ("IncompatibleAdapterError", ("none of the 1 module(s)", "change nothing")),
    "partly_matching.safetensors": ("IncompatibleAdapterError", ("1 of the 2 modules", "every key")),
    # Headers the safetensors library or Python's json fail on with their own exceptions (issue 11):
    # each must end in one clear line before any library parses the file.
    "deep_header.safetensors": ("CorruptWeightsError", ("nests more than 3 levels",)),
    "boolean_shape.safetensors": ("CorruptWeightsError", ("has shape [true, 0]", "whole numbers")),
    "huge_dimension.safetensors": ("CorruptWeightsError", ("1180591620717411303424", "whole numbers")),
    "huge_product.safetensors": ("CorruptWeightsError", ("more than 2**48 elements",)),
    "unknown_dtype.safetensors": ("CorruptWeightsError", ("unknown dtype 'q9'",)),
    "negative_offset.safetensors": ("CorruptWeightsError", ("data_offsets [-4, 0]", "0 <= begin <= end")),
    "offset_past_end.safetensors": ("CorruptWeightsError", ("truncated", "ends at byte 1000")),
    "nan_offset.safetensors": ("CorruptWeightsError", ("nan is not a json number",)),
    "lone_surrogate.safetensors": ("CorruptWeightsError", ("not valid utf-8",)),
    "duplicate_key.safetensors": ("CorruptWeightsError", ("appears twice",)),
    "metadata_not_object.safetensors": ("CorruptWeightsError", ("__metadata__ must map strings to strings",)),
    "extra_entry_field.safetensors": ("CorruptWeightsError", ("exactly dtype, shape and data_offsets",)),
    "bad_peft_alpha.safetensors": ("CorruptWeightsError", ("unet.lora_alpha = 'eight'", "must be a number")),
    "loha_scalar.safetensors": ("CorruptWeightsError", ("hada_w1_b has shape []", "not a matrix")),
}


def _raw(path: Path, header: dict, data: bytes = b"", *, length: int | None = None) -> None:
    """A safetensors file written by hand: 8-byte little-endian header length, JSON, data."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _text(path: Path, text: str, data: bytes = b"") -> None:
    """A safetensors file whose header is ``text`` verbatim (JSON no library would write)."""
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _pair(a_shape, a_offsets, b_shape, b_offsets, **extra) -> dict:
    """The header of one LoRA module of the tiny UNet, lora_A and lora_B in F32, plus ``extra`` entries."""
    return {f"unet.{TINY_Q}.lora_A.weight": {"dtype": "F32", "shape": a_shape, "data_offsets": a_offsets},
            f"unet.{TINY_Q}.lora_B.weight": {"dtype": "F32", "shape": b_shape, "data_offsets": b_offsets},
            **extra}


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _lora(prefix: str, rank: int, fan_in: int, fan_out: int, *, kohya: bool = False) -> dict:
    import torch

    g = torch.Generator().manual_seed(len(prefix))
    down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
    return {prefix + down: torch.randn(rank, fan_in, generator=g) * 0.01,
            prefix + up: torch.randn(fan_out, rank, generator=g) * 0.01}


def build_corpus(folder: str | Path) -> dict[str, Path]:
    """Write every file of :data:`CORPUS` into ``folder``; return name -> path."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = {name: folder / name for name in CORPUS}
    good = _lora(f"unet.{TINY_Q}", 4, 64, 64)

    p["pickle.ckpt"].write_bytes(pickle.dumps({"state_dict": {"w": [0.0] * 4}}, protocol=2))
    p["pickle_renamed.safetensors"].write_bytes(pickle.dumps({"w": [0.0] * 4}, protocol=4))
    p["torch_zip.safetensors"].write_bytes(b"PK\x03\x04" + bytes(60))
    p["empty.safetensors"].write_bytes(b"")
    _save(p["truncated.safetensors"], good)
    blob = p["truncated.safetensors"].read_bytes()
    p["truncated.safetensors"].write_bytes(blob[:-16])  # the last tensor loses its final 4 floats
    _raw(p["oversized_header.safetensors"], {}, length=1_000_000_000)
    text = b"this is not json"
    p["not_json.safetensors"].write_bytes(struct.pack("<Q", len(text)) + text)
    # Two F32[2,2] tensors (16 bytes each) in a 24-byte data section: the second starts inside the first.
    _raw(p["overlapping.safetensors"], {
        f"unet.{TINY_Q}.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        f"unet.{TINY_Q}.lora_B.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    }, bytes(24))
    _raw(p["wrong_size.safetensors"], {  # F32[4,4] needs 64 bytes; the offsets give it 32
        f"unet.{TINY_Q}.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]},
    }, bytes(32))
    _raw(p["bad_metadata.safetensors"], {"__metadata__": {"ss_network_dim": 4}})
    _raw(p["no_tensors.safetensors"], {"__metadata__": {"ss_output_name": "nothing"}})
    _save(p["full_checkpoint.safetensors"], {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                                            "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    _save(p["unknown_keys.safetensors"], {**good, "unet.extra.weight": torch.zeros(2)})
    _save(p["mixed_layouts.safetensors"], {
        **good, **_lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 4, 64, 64, kohya=True)})
    _save(p["kohya_dora.safetensors"], {  # DoRA normalised per input channel ([1, in]): no peft form
        **_lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 4, 64, 64, kohya=True),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale": torch.ones(1, 64),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)})
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    _save(p["lycoris_loha_dora.safetensors"], {  # LyCORIS LoHa with weight decomposition: no peft form
        f"{flat}.hada_w1_a": torch.zeros(64, 4), f"{flat}.hada_w1_b": torch.zeros(4, 64),
        f"{flat}.hada_w2_a": torch.zeros(64, 4), f"{flat}.hada_w2_b": torch.zeros(4, 64),
        f"{flat}.dora_scale": torch.ones(64, 1), f"{flat}.alpha": torch.tensor(4.0)})
    _save(p["incomplete.safetensors"], {f"unet.{TINY_Q}.lora_A.weight": torch.zeros(4, 64)})
    _save(p["rank_mismatch.safetensors"], {f"unet.{TINY_Q}.lora_A.weight": torch.zeros(4, 64),
                                           f"unet.{TINY_Q}.lora_B.weight": torch.zeros(64, 3)})
    nan = dict(good)
    nan[f"unet.{TINY_Q}.lora_B.weight"] = torch.full((64, 4), float("nan"))
    _save(p["nan.safetensors"], nan)
    _save(p["sdxl_kohya.safetensors"], {
        **_lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 4, 2048, 640, kohya=True),
        **_lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 4, 1280, 1280, kohya=True)})
    # SDXL in diffusers naming: the module exists in the tiny UNet, the 2048-wide input does not fit.
    _save(p["sdxl_shapes.safetensors"], _lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                                              4, 2048, 640))
    _save(p["sd2_shapes.safetensors"], _lora(f"unet.{TINY_K2}", 4, 1024, 320))
    _save(p["flux.safetensors"], _lora("transformer.single_transformer_blocks.0.attn.to_q", 4, 3072, 3072))
    _save(p["sd3.safetensors"], _lora("lora_transformer_joint_blocks_0_x_block_attn_qkv", 4, 1536, 4608, kohya=True))
    # SD-1.5: first down block 320 wide, cross-attention 768 (what a LoRA trained on real SD-1.5 has)
    _save(p["sd15_on_tiny.safetensors"], {**_lora(f"unet.{TINY_Q}", 4, 320, 320),
                                          **_lora(f"unet.{TINY_K2}", 4, 768, 320)})
    _save(p["sd15_text_encoder.safetensors"], _lora("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                                    4, 768, 768))
    _save(p["zero_matching.safetensors"], _lora("unet.not_a_block.0.to_q", 4, 64, 64))
    _save(p["partly_matching.safetensors"], {**good, **_lora("unet.down_blocks.7.attentions.0.proj_in", 4, 64, 64)})

    # A rank-1 module is 64 + 64 floats: lora_A [1, 64] at bytes [0, 256), lora_B [64, 1] at [256, 512).
    valid = _pair([1, 64], [0, 256], [64, 1], [256, 512])
    _text(p["deep_header.safetensors"], '{"x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    _raw(p["boolean_shape.safetensors"], _pair([True, 0], [0, 0], [64, 1], [0, 256]), bytes(256))
    bias = f"unet.{TINY_Q}.lora_B.bias"
    _raw(p["huge_dimension.safetensors"], {**valid, bias: {"dtype": "F32", "shape": [2**70, 0],
                                                           "data_offsets": [512, 512]}}, bytes(512))
    _raw(p["huge_product.safetensors"], {**valid, bias: {"dtype": "F32", "shape": [2**40, 2**40, 0],
                                                         "data_offsets": [512, 512]}}, bytes(512))
    _raw(p["unknown_dtype.safetensors"], {**valid, f"unet.{TINY_Q}.lora_A.weight": {
        "dtype": "Q9", "shape": [1, 64], "data_offsets": [0, 256]}}, bytes(512))
    _raw(p["negative_offset.safetensors"], _pair([1, 64], [-4, 0], [64, 1], [0, 256]), bytes(256))
    _raw(p["offset_past_end.safetensors"], _pair([1, 64], [0, 256], [64, 1], [256, 1000]), bytes(512))
    _text(p["nan_offset.safetensors"], json.dumps(valid).replace("256]", "NaN]", 1), bytes(512))
    _text(p["lone_surrogate.safetensors"], json.dumps(valid).replace("to_q", "to_q\\ud800"), bytes(512))
    entry_a = json.dumps(valid[f"unet.{TINY_Q}.lora_A.weight"])
    _text(p["duplicate_key.safetensors"], json.dumps(valid)[:-1] + f', "unet.{TINY_Q}.lora_A.weight": {entry_a}}}',
          bytes(512))
    _raw(p["metadata_not_object.safetensors"], {"__metadata__": 0, **valid}, bytes(512))
    _raw(p["extra_entry_field.safetensors"], {**valid, f"unet.{TINY_Q}.lora_A.weight": {
        "dtype": "F32", "shape": [1, 64], "data_offsets": [0, 256], "extra": 1}}, bytes(512))
    _raw(p["bad_peft_alpha.safetensors"], {"__metadata__": {"lora_adapter_metadata": json.dumps(
        {"unet.r": 1, "unet.lora_alpha": "eight"})}, **valid}, bytes(512))
    _save(p["loha_scalar.safetensors"], {
        f"unet.{TINY_Q}.hada_w1_a": torch.zeros(64, 4), f"unet.{TINY_Q}.hada_w1_b": torch.zeros(()),
        f"unet.{TINY_Q}.hada_w2_a": torch.zeros(64, 4), f"unet.{TINY_Q}.hada_w2_b": torch.zeros(4, 64)})
    return p


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bad_loras")
    for name, path in build_corpus(out).items():
        print(f"{path}  -> {CORPUS[name][0]}")
