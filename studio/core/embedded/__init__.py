"""The embedded base models: real diffusers pipelines small enough to ship and run on CPU.

``tiny/`` holds ``tiny``, an SD-1 pipeline trained on procedural 32 px scenes; ``tiny-sdxl/`` holds
``tiny-sdxl``, an SDXL pipeline (two CLIP text encoders, a ``text_time`` UNet) trained on the same
scenes with the same VAE; ``tiny-flux/`` holds ``tiny-flux``, a FLUX.1-dev-like flow-matching
transformer (CLIP pooled + T5 conditioning, a guidance input) on the same scenes and VAE;
``tiny-sd3/`` holds ``tiny-sd3``, an SD3.5-like MMDiT (RMS-norm q/k, a dual-attention layer, two CLIP
encoders with projection and a T5) on the same scenes and VAE. The recipe
that rebuilds them from a seed, the scene drawer and the quality and style checks are tools of the
app layer (``studio/app/tiny/``); this package holds only the weights and where they are.
"""

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
TINY_MODEL_DIR = EMBEDDED_DIR / "tiny"
TINY_NATIVE_RESOLUTION = 32
# Embedded model name (what users type as a base model) -> its folder.
EMBEDDED_MODELS = {name: EMBEDDED_DIR / name for name in ("tiny", "tiny-sdxl", "tiny-flux", "tiny-sd3")}
# Presets on an embedded model take these in place of their family's full-size numbers (keys as in
# ``studio.core.families.base.TrainingPreset``): at 32 px the tiny models learn a style in a few hundred
# steps of batch 4 at 1e-3 (the sample datasets' full run is 500), not the thousands of steps at 1e-4 a
# full-size model takes. "quick" stays about 20 steps: seconds on a CPU, enough to see the run work.
EMBEDDED_PRESET_OVERRIDES = {
    "quick": {"max_train_steps": 20, "lr_warmup_steps": 0, "learning_rate": 1e-3, "train_batch_size": 4},
    "balanced": {"max_train_steps": 150, "lr_warmup_steps": 10, "learning_rate": 1e-3, "train_batch_size": 4},
    "high quality": {"max_train_steps": 500, "lr_warmup_steps": 25, "learning_rate": 1e-3, "train_batch_size": 4},
}
