"""What a run gives back: images, each with the single-image request that re-makes it, saved as PNGs
that carry their recipe.

:class:`GeneratedImage` is one image, its request (``num_images`` 1, its own seed, sizes resolved) and
the base model's family, which spells the adapters' per-role strengths in the recipe it writes;
:class:`GenerationResult` is every image of one request. Saving is atomic and never overwrites.

Does not hold: the recipe's contents (``studio.generation.recipes``), making the images
(``studio.generation.run``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from studio.core.atomic import write_atomic
from studio.core.families import Family
from studio.generation.recipes import RECIPE_KEY, recipe_payload
from studio.generation.requests import GenerationRequest


@dataclass
class GeneratedImage:
    """One image with the exact single-image request that re-makes it."""

    image: object  # PIL.Image.Image
    request: GenerationRequest  # num_images=1, seed = this image's seed, sizes resolved
    parameters: str  # the A1111 "parameters" text
    model_hash: str
    family: Family | None = None  # the base model's; None for a pipeline class no family lists
    dtypes: dict[str, str] | None = None  # each component's dtype as it ran (base_models.pipeline_dtypes)

    @property
    def seed(self) -> int:
        return self.request.seed

    def pnginfo(self) -> PngInfo:
        info = PngInfo()
        info.add_text("parameters", self.parameters)
        payload = recipe_payload(self.request, self.model_hash, self.family, self.dtypes)
        info.add_text(RECIPE_KEY, json.dumps(payload, ensure_ascii=False))
        return info

    def save(self, path: str | Path) -> Path:
        """Write the PNG with its recipe atomically (temp file in the same folder, then rename)."""
        return write_atomic(path, lambda f: self.image.save(f, format="PNG", pnginfo=self.pnginfo()))


@dataclass
class GenerationResult:
    request: GenerationRequest  # resolved: seed and sizes filled in
    outputs: list[GeneratedImage]
    seconds: float

    @property
    def images(self) -> list:
        return [o.image for o in self.outputs]

    @property
    def seeds(self) -> list[int]:
        return [o.seed for o in self.outputs]

    def save(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        """Save every image under ``out_dir`` as ``<stem>-<seed>.png`` without overwriting files."""
        out_dir = Path(out_dir)
        stem = stem or time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for out in self.outputs:
            path = out_dir / f"{stem}-{out.seed}.png"
            n = 1
            while path.exists():
                path = out_dir / f"{stem}-{out.seed}-{n}.png"
                n += 1
            paths.append(out.save(path))
        return paths
