"""The training caches' in-memory layer: bounded by entries and by bytes, files kept whole."""

import torch

from trainer.caches import TensorCache


def test_memory_is_bounded_by_bytes_and_evicted_entries_come_back_from_disk(tmp_path):
    # 4 KiB entries (1024 fp32) under a 10 KiB bound: two stay in memory, the rest are read back from files.
    cache = TensorCache(tmp_path, memory_entries=100, memory_bytes=10 * 1024)
    for i in range(5):
        cache.put(cache.key(i), {"x": torch.full((1024,), float(i))})
    assert cache.memory_bytes == 2 * 4096
    assert len(cache._memory) == 2
    cache.hits = 0
    for i in range(5):
        assert torch.equal(cache.get(cache.key(i))["x"], torch.full((1024,), float(i)))
    assert cache.hits == 5 and cache.memory_bytes <= 10 * 1024


def test_an_entry_larger_than_the_byte_bound_is_still_kept_and_replacing_a_key_counts_once(tmp_path):
    cache = TensorCache(tmp_path, memory_bytes=1024)
    cache.put("a", {"x": torch.zeros(1024)})  # 4 KiB > 1 KiB
    assert cache.get("a") is not None and cache.memory_bytes == 4096
    cache.put("a", {"x": torch.zeros(512)})
    assert cache.memory_bytes == 2048 and len(cache._memory) == 1
    cache.put("b", {"x": torch.zeros(16)})
    assert list(cache._memory) == ["b"] and cache.memory_bytes == 64
