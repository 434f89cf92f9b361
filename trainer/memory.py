"""How much accelerator memory a training run needs, before it starts, and which settings would fit.

The estimate adds up what stays resident during a step:

- **weights**: every pipeline component the trainer keeps on the device, at the run's precision
  (bf16/fp16: 2 bytes a weight, fp32: 4), the denoiser's block layers at NF4/int8 when
  ``model.quantize`` asks (:data:`studio.core.quantize.BYTES_PER_WEIGHT`);
- **adapter**: the trainable LoRA weights in fp32 (4 bytes), their gradients (4) and AdamW's two
  moments (8; 2 with 8-bit AdamW);
- **activations** of a transformer denoiser, from Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models"): a layer over ``s`` tokens of width ``h`` keeps
  ``34 s b h`` bytes in 16-bit precision with memory-efficient attention (SDPA stores no score
  matrix); with gradient checkpointing only each layer's input (``2 s b h``) stays, plus one layer
  recomputed. FLUX's double and single blocks count as one layer each over image + text tokens.
  UNets have no such closed form; their activations are not estimated and the estimate says so.

It is an estimate (allocator fragmentation and the CUDA context add a few hundred MB): good enough
to say before a 24 GB run whether it needs NF4, and, after an out-of-memory error, which settings
would fit (:func:`settings_that_fit`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from studio.core.quantize import BYTES_PER_WEIGHT, quantizable

GIB = 1024**3
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34  # per layer, 16-bit, memory-efficient attention (Korthikanti et al.)
# Optimizer state per trainable weight, bytes: AdamW's two float32 moments (8-bit: one byte each); Prodigy's
# two moments, its initial copy p0 and its s accumulator; Lion's one moment; schedule-free AdamW's z and
# second moment.
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "lion": 4, "adamw_schedulefree": 8}


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs to know of a loaded (or meta-device) pipeline."""

    component_params: dict[str, int]  # parameters of every component the trainer keeps on the device
    denoiser: str
    quantizable: int  # denoiser weights in layers model.quantize would quantize
    adapter_params: int  # trainable LoRA weights
    width: int | None  # a transformer denoiser's hidden width; None for UNets
    layers: int
    text_tokens: int  # tokens of text the transformer attends over beside the image's
    pixels_per_token: int  # image pixels along one side of one denoiser token (FLUX: 8x VAE x 2 packing)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapter: int
    activations: int | None

    @property
    def total(self) -> int:
        return self.weights + self.adapter + (self.activations or 0)

    def describe(self) -> str:
        acts = f"{self.activations / GIB:.1f} GiB activations" if self.activations is not None else \
            "activations not estimated (UNet)"
        return (f"~{self.total / GIB:.1f} GiB: {self.weights / GIB:.1f} GiB weights, {self.adapter / GIB:.2f} GiB "
                f"adapter + gradients + optimizer, {acts}")


def sizes_of(components, family, adapter_params: int, text_tokens: int) -> ModelSizes:
    """:class:`ModelSizes` of a pipeline of ``family`` given as its components by name (``pipe.components``;
    the weights may be on the meta device)."""
    import torch

    models = {name: module for name, module in components.items() if isinstance(module, torch.nn.Module)}
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in models.items()}
    denoiser = models[family.denoiser]
    quant = sum(m.weight.numel() for n, m in denoiser.named_modules() if quantizable(n, m))
    config = denoiser.config
    width = layers = None
    if family.denoiser == "transformer":
        width = config.num_attention_heads * config.attention_head_dim
        layers = config.num_layers + getattr(config, "num_single_layers", 0)
    vae_factor = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    packing = 2 if family.pack_latents is not None else getattr(config, "patch_size", 1) or 1
    return ModelSizes(component_params=params, denoiser=family.denoiser, quantizable=quant,
                      adapter_params=adapter_params, width=width, layers=layers or 0, text_tokens=text_tokens,
                      pixels_per_token=vae_factor * packing)


def estimate(config, sizes: ModelSizes, *, on_gpu: bool = True) -> MemoryEstimate:
    """The memory ``config`` (a resolved ``TrainConfig``) needs on the device for a model of ``sizes``."""
    t = config.training
    weight_bytes = 2 if (on_gpu and t.mixed_precision in ("fp16", "bf16")) else 4
    weights = 0
    for name, n in sizes.component_params.items():
        if name == sizes.denoiser and config.model.quantize != "no":
            weights += int(sizes.quantizable * BYTES_PER_WEIGHT[config.model.quantize])
            weights += (n - sizes.quantizable) * weight_bytes
        else:
            weights += n * weight_bytes
    # float32 weights + gradients + the optimizer's state, and the EMA's float32 copy when there is one
    adapter = sizes.adapter_params * (4 + 4 + OPTIMIZER_BYTES[t.optimizer] + (4 if t.ema_decay else 0))
    activations = None
    if sizes.width:
        side = config.dataset.resolution // sizes.pixels_per_token
        tokens = side * side + sizes.text_tokens
        per_layer = ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * t.train_batch_size * sizes.width * weight_bytes // 2
        if t.gradient_checkpointing:
            activations = sizes.layers * 2 * tokens * t.train_batch_size * sizes.width * weight_bytes // 2 + per_layer
        else:
            activations = sizes.layers * per_layer
    return MemoryEstimate(weights=weights, adapter=adapter, activations=activations)


# What to change, in the order a user loses least by it (speed first, then precision, then the data).
_SAVINGS: tuple[tuple[str, str, object], ...] = (
    ("training", "gradient_checkpointing", True),
    ("training", "optimizer", "adamw8bit"),
    ("training", "mixed_precision", "bf16"),
    ("model", "quantize", "int8"),
    ("model", "quantize", "nf4"),
    ("training", "train_batch_size", 1),
)


def settings_that_fit(config, sizes: ModelSizes, available: int) -> list[str] | None:
    """The fewest changes (in :data:`_SAVINGS` order, cumulative) after which the estimate fits in
    ``available`` bytes, as ``section.option = value`` lines; [] if it fits already; None if nothing does
    (then a lower dataset.resolution or network.rank is what is left)."""
    changes: list[str] = []
    current = config
    if estimate(current, sizes).total <= available:
        return []
    for section, option, value in _SAVINGS:
        part = getattr(current, section)
        if getattr(part, option) == value or (option == "quantize" and part.quantize == "nf4"):
            continue
        current = replace(current, **{section: replace(part, **{option: value})})
        changes = [c for c in changes if not c.startswith(f"{section}.{option} =")]
        changes.append(f"{section}.{option} = {value!r}".replace("'", '"').replace("True", "true"))
        if estimate(current, sizes).total <= available:
            return changes
    return None
