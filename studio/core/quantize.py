"""Quantized frozen bases: the denoiser's block Linear layers stored in 4-bit NF4 or 8-bit by bitsandbytes.

QLoRA's recipe (Dettmers et al. 2023): the frozen base holds its weights in NF4 (or int8) and
dequantizes them per matmul, while the LoRA weights on top train in full precision. A FLUX.1
transformer is 11.9 B parameters, 23.8 GB in bf16 and about 6.7 GB in NF4 (4 bits a weight plus one
fp32 absmax per 64-weight block), which is what lets a Flux LoRA train on a 24 GB GPU.

The studio swaps the layers itself (``bnb.nn.Linear4bit`` / ``Linear8bitLt``) rather than loading
through diffusers' ``BitsAndBytesConfig``, whose environment check refuses to run without CUDA: the
same code runs on a GPU and on CPU (bitsandbytes 0.50 has CPU kernels; slower than fp32 there, the
point is memory), so the path users take on GPUs is the path the tests take here.

Only Linear layers inside the denoiser's blocks whose input width is a multiple of 64 (the 4-bit
quantization block) are swapped; embedders, the final projection and narrow layers stay in full
precision, as they are a rounding error of the parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.core.errors import ConfigError

QUANTIZATIONS = ("no", "nf4", "int8")
QUANT_BLOCK = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per 64 weights
# Bytes a weight costs on the device, quantization constants included.
BYTES_PER_WEIGHT = {"nf4": 0.5 + 4 / QUANT_BLOCK, "int8": 1.0 + 4 / 4096}  # int8: one fp32 scale per row (~4k wide)
_BLOCK_MARKERS = ("blocks.",)  # transformer_blocks., single_transformer_blocks., down_blocks., ...


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_blocks` swapped: layers, their weights, and the bytes before and after."""

    kind: str
    layers: int
    weights: int
    bytes_before: int
    bytes_after: int


def quantizable(name: str, module) -> bool:
    """Whether ``module`` (named ``name`` in the denoiser) is a block Linear layer the studio quantizes."""
    import torch

    return (isinstance(module, torch.nn.Linear) and any(marker in name for marker in _BLOCK_MARKERS)
            and module.in_features % QUANT_BLOCK == 0)


def quantize_blocks(model, kind: str, *, device, compute_dtype) -> QuantizeReport:
    """Replace ``model``'s block Linear layers by bitsandbytes ``kind`` (``nf4`` or ``int8``) layers on
    ``device``, frozen; ``compute_dtype`` is what the 4-bit layers dequantize to for each matmul."""
    import torch

    from studio.core.thirdparty import allow_bitsandbytes

    if kind not in QUANTIZATIONS[1:]:
        raise ConfigError(f"model.quantize = {kind!r}: use one of {', '.join(QUANTIZATIONS)}", option="model.quantize")
    try:
        bnb = allow_bitsandbytes()
    except ImportError:
        raise ConfigError("model.quantize needs bitsandbytes: pip install bitsandbytes (or set model.quantize = "
                          "\"no\")", option="model.quantize") from None
    layers = weights = before = after = 0
    targets = [(name, module) for name, module in model.named_modules() if quantizable(name, module)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        has_bias = linear.bias is not None
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", torch.float32), requires_grad=False,
                                             quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, device="meta")
            layer.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu", torch.float16), requires_grad=False,
                                             has_fp16_weights=False)
        if has_bias:
            layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        layer = layer.to(device)  # bitsandbytes quantizes on this move
        setattr(parent, child, layer)
        layers += 1
        weights += linear.weight.numel()
        before += linear.weight.numel() * linear.weight.element_size()
        after += int(linear.weight.numel() * BYTES_PER_WEIGHT[kind])
    return QuantizeReport(kind=kind, layers=layers, weights=weights, bytes_before=before, bytes_after=after)
