"""Training caches: VAE latents and text embeddings, computed once and reused across steps and runs.

The reference training loop (diffusers' train_text_to_image_lora.py) runs the VAE encoder and the
text encoder on every step although neither changes while only adapters train. Here both results
are stored under ``$LORA_STUDIO_HOME/cache``:

- latents: the VAE's posterior (mean and std) of one prepared image, keyed by the image's content
  hash, its bucket, crop window and flip (flip-aware: a mirrored sample is another entry) and the
  VAE's weights hash. A fresh latent is sampled from the cached posterior at each step, the same
  distribution the reference loop samples from. With ``random_crop`` every step may cut a new
  window, so latents are encoded every step instead (kohya refuses to cache then, for the same
  reason).
- text embeddings: the text encoder's output for one caption string, keyed by the caption and the
  text encoder's weights hash; used only while the text encoder is frozen.

Each entry is one small safetensors file written atomically (several processes may fill the same
cache at once: the rename makes the last writer win with identical bytes). A bounded in-memory
layer in front keeps the hot entries.

Not here: which samples a batch holds (``trainer/data.py``) and the loss (``trainer/loop.py``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from studio.core.atomic import write_bytes_atomic
from studio.core.settings import get_settings

# In-memory entries per cache, bounded by count and by bytes. An entry's size depends on the family
# and the resolution: an SD-1 model at 512 px has latents of 2 x 4x64x64 fp32 = 128 KiB and text
# embeddings of 77x768 fp32 = 231 KiB (4096 of them: 0.9 GiB); SDXL's conditioning is 77x2048 + 1280
# fp32 = 621 KiB a caption, so 4096 would be 2.5 GiB: the byte bound (1 GiB) keeps ~1700 of those.
MEMORY_ENTRIES = 4096
MEMORY_BYTES = 1 << 30


class TensorCache:
    """A content-keyed cache of small tensor dicts: memory in front of one file per entry."""

    def __init__(self, root: str | Path, *, memory_entries: int = MEMORY_ENTRIES,
                 memory_bytes: int = MEMORY_BYTES) -> None:
        self.root = Path(root)
        self._memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._limit = memory_entries
        self._byte_limit = memory_bytes
        self.memory_bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            return entry
        path = self._path(key)
        if path.is_file():
            from safetensors.torch import load_file  # lazy: safetensors.torch imports torch

            try:
                entry = load_file(str(path))
            except (SafetensorError, OSError, ValueError):
                path.unlink(missing_ok=True)  # a damaged entry is recomputed, never trusted
                entry = None
            if entry is not None:
                self._remember(key, entry)
                self.hits += 1
                return entry
        self.misses += 1
        return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        from safetensors.torch import save  # lazy: safetensors.torch imports torch

        entry = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        self._remember(key, entry)
        # Serialized in memory (an entry is at most a few hundred KiB) so the studio's atomic writer
        # writes it: a full disk is then a DiskFullError, not safetensors' errno-less SafetensorError.
        write_bytes_atomic(self._path(key), save(entry))

    def _remember(self, key: str, entry: dict[str, Any]) -> None:
        self._forget(key)
        self._memory[key] = entry
        self._sizes[key] = size = sum(v.numel() * v.element_size() for v in entry.values())
        self.memory_bytes += size
        # The newest entry always stays (one entry larger than the byte bound is still usable).
        while len(self._memory) > 1 and (len(self._memory) > self._limit or self.memory_bytes > self._byte_limit):
            self._forget(next(iter(self._memory)))

    def _forget(self, key: str) -> None:
        if self._memory.pop(key, None) is not None:
            self.memory_bytes -= self._sizes.pop(key)


def cache_root() -> Path:
    return get_settings().home / "cache"


__all__ = ["MEMORY_BYTES", "MEMORY_ENTRIES", "TensorCache", "cache_root"]
