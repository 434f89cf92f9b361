"""The blob store (atomic, immutable, verified, 0644) and the file hashes (tensor-only, AutoV2, A1111)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import time

import pytest

from adapters import store as store_module
from adapters.store import BlobStore
from studio.core.errors import (
    BlobNotFoundError,
    CorruptWeightsError,
    HashMismatchError,
    InputFileNotFoundError,
    InvalidRequestError,
    StudioError,
)
from studio.core.hashing import (
    A1111_LENGTH,
    A1111_OFFSET,
    a1111_legacy_hash,
    autov2,
    file_sha256,
    hash_weights,
    read_header,
    tensor_sha256,
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _save(path, tensors: dict, metadata: dict | None = None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _tensors(seed: int = 0, n: int = 3, size: int = 8) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"lora_unet_block_{i}.lora_down.weight": torch.randn(size, size, generator=g) for i in range(n)}


# ---- the store ---------------------------------------------------------------------------------


def test_default_root_is_home_blobs(studio_home):
    assert BlobStore().root == studio_home / "blobs"


def test_put_bytes_round_trip_and_fan_out_layout(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"hello")
    assert sha == _sha(b"hello")
    assert store.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert store.path(sha).read_bytes() == b"hello"
    assert store.exists(sha) and store.size(sha) == 5 and store.verify(sha)
    assert list(store) == [sha]


def test_put_file_from_a_0600_source_gives_a_0644_blob(tmp_path):
    src = tmp_path / "adapter.safetensors"
    src.write_bytes(b"x" * 1000)
    os.chmod(src, 0o600)  # what safetensors' save_file leaves behind
    old = os.umask(0o077)  # a strict umask must not leak into blobs either
    try:
        sha = BlobStore(tmp_path / "blobs").put_file(src)
    finally:
        os.umask(old)
    blob = tmp_path / "blobs" / sha[:2] / sha
    assert stat.S_IMODE(blob.stat().st_mode) == 0o644
    assert blob.read_bytes() == src.read_bytes()


def test_re_put_is_a_no_op_and_never_rewrites(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    src = tmp_path / "f"
    src.write_bytes(b"same bytes")
    sha = store.put_file(src)
    before = store.path(sha).stat()
    time.sleep(0.01)
    assert store.put_file(src) == sha
    assert store.put_bytes(b"same bytes") == sha
    after = store.path(sha).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_put_verifies_the_hash_and_leaves_nothing_on_mismatch(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    src = tmp_path / "f"
    src.write_bytes(b"actual content")
    wrong = _sha(b"what the caller thought the file held")
    # As if the source changed between hashing and copying: the copy's hash is checked, not trusted.
    with pytest.raises(HashMismatchError) as err:
        store.put_file(src, sha256=wrong)
    assert isinstance(err.value, ValueError) and isinstance(err.value, StudioError)
    assert not store.exists(wrong)
    assert not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))  # no blob, no temporary file
    with pytest.raises(HashMismatchError):
        store.put_bytes(b"abc", sha256=wrong)


def test_a_failed_rename_leaves_no_blob_and_no_temp(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "blobs")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # the rename inside studio.core.atomic.write_atomic
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes(b"payload")
    assert not store.exists(_sha(b"payload"))
    assert not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))


def test_writes_fsync_the_folder(tmp_path, monkeypatch):
    synced = []
    real = store_module._fsync_dir
    monkeypatch.setattr(store_module, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"durable")
    # The new fan-out folder's entry, then the blob's rename; later the unlink.
    assert synced == [tmp_path / "blobs", store.path(sha).parent]
    synced.clear()
    assert store.delete(sha) is True
    assert synced == [store.path(sha).parent]


def test_delete(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"gone soon")
    assert store.delete(sha) is True
    assert not store.exists(sha) and store.delete(sha) is False
    with pytest.raises(BlobNotFoundError):
        store.size(sha)
    with pytest.raises(FileNotFoundError):  # also the built-in
        store.verify(sha)


def test_blob_names_are_checked(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    for bad in ("../../etc/passwd", "ab", "A" * 64, "g" * 64, "a" * 64 + "\n", ""):
        with pytest.raises(InvalidRequestError):
            store.path(bad)


def test_missing_source(tmp_path):
    with pytest.raises(InputFileNotFoundError) as err:
        BlobStore(tmp_path / "blobs").put_file(tmp_path / "nope.safetensors")
    assert isinstance(err.value, FileNotFoundError)


def test_damaged_blob_is_replaced_and_verify_catches_corruption(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"0123456789")
    target = store.path(sha)
    os.chmod(target, 0o644)
    target.write_bytes(b"01234")  # truncated behind the store's back
    assert store.put_bytes(b"0123456789") == sha and target.read_bytes() == b"0123456789"
    target.write_bytes(b"0123456780")  # same size, flipped byte: only a re-hash notices
    assert store.verify(sha) is False


def test_iteration_skips_temp_files_and_stale_temps_are_found_by_age(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"kept")
    fresh = store.path(sha).parent / f".{sha[:16]}-abc.tmp"
    old = store.path(sha).parent / f".{sha[:16]}-def.tmp"
    fresh.write_bytes(b"in flight")
    old.write_bytes(b"crashed")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert list(store) == [sha]
    assert store.stale_temp_files(3600) == [old]


# ---- hashes ------------------------------------------------------------------------------------


def test_tensor_hash_ignores_metadata_and_matches_the_bytes_after_the_header(tmp_path):
    tensors = _tensors(1)
    a = _save(tmp_path / "a.safetensors", tensors, {"ss_output_name": "a"})
    b = _save(tmp_path / "b.safetensors", tensors, {"ss_output_name": "b", "modelspec.title": "B"})
    raw = a.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert tensor_sha256(a) == _sha(raw[8 + n:])  # kohya's sshs_model_hash definition
    assert tensor_sha256(a) == tensor_sha256(b)
    assert file_sha256(a) != file_sha256(b)
    assert tensor_sha256(_save(tmp_path / "c.safetensors", _tensors(2))) != tensor_sha256(a)


def test_hash_weights_gives_every_hash_in_one_pass(tmp_path):
    path = _save(tmp_path / "big.safetensors", {"w": __import__("torch").randn(600, 600)}, {"k": "v"})
    raw = path.read_bytes()
    assert len(raw) > A1111_OFFSET + A1111_LENGTH  # 600*600*4 bytes = 1.37 MiB
    header, hashes = hash_weights(path)
    assert hashes.sha256 == _sha(raw) == file_sha256(path)
    assert hashes.autov2 == _sha(raw)[:10] == autov2(hashes.sha256)
    assert hashes.a1111_legacy == _sha(raw[0x100000:0x110000])[:8] == a1111_legacy_hash(path)
    assert hashes.size_bytes == len(raw)
    assert header.metadata == {"k": "v"} and header.tensors["w"].shape == (600, 600)
    assert header.tensors["w"].dtype == "F32" and header.data_offset == 8 + header.header_size


def test_a1111_hash_of_a_small_file_is_the_empty_window(tmp_path):
    path = _save(tmp_path / "small.safetensors", _tensors())
    assert a1111_legacy_hash(path) == _sha(b"")[:8] == "e3b0c442"  # what A1111 shows for < 1 MiB files


def test_damaged_files_are_refused_with_a_reason(tmp_path):
    good = _save(tmp_path / "good.safetensors", _tensors()).read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])

    def with_header(obj) -> bytes:
        raw = json.dumps(obj).encode()
        return len(raw).to_bytes(8, "little") + raw + good[8 + n:]

    bad_meta = dict(header, __metadata__={"rank": 4})
    cases = {
        "short": (b"\x01\x02", "8-byte header length"),
        "huge-header": ((10**12).to_bytes(8, "little") + b"{}", "does not fit"),
        "not-json": (b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", "not JSON"),
        "truncated": (good[:-10], "truncated"),
        "trailing": (good + b"junk", "trailing bytes"),
        "meta-not-str": (with_header(bad_meta), "strings to strings"),
        "list-header": (with_header([1, 2]), "not a JSON object"),
    }
    for label, (data, reason) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CorruptWeightsError, match=reason):
            read_header(path)
        with pytest.raises(CorruptWeightsError):
            hash_weights(path)
    with pytest.raises(InputFileNotFoundError):
        read_header(tmp_path / "missing.safetensors")


# ---- a full disk: no partial file, nothing stored before lost, one clear line ---------------------


def _disk_full_under(monkeypatch, folder, *, only: str = "") -> list[str]:
    """Make the disk look full for regular files written under ``folder`` (whose path contains ``only``):
    flushing them raises ENOSPC, as a write or fsync does on a full filesystem. Returns the paths hit."""
    import errno

    real_fsync = os.fsync
    hit = []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISREG(os.fstat(fd).st_mode) and target.startswith(str(folder)) and only in target:
            hit.append(target)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hit


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def _tiny_lora(path, seed: int):
    import torch
    from safetensors.torch import save_file

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear(64, 64) in the tiny UNet
    g = torch.Generator().manual_seed(seed)
    save_file({f"{module}.lora_A.weight": torch.randn(4, 64, generator=g),
               f"{module}.lora_B.weight": torch.randn(64, 4, generator=g)}, str(path))
    return path


def test_a_full_disk_during_an_import_stores_nothing_and_says_so(studio_home, tmp_path, monkeypatch, capsys):
    from adapters.registry import Registry
    from studio.app.cli import main

    assert main(["adapters", "import", str(_tiny_lora(tmp_path / "a.safetensors", 1)), "--name", "style"]) == 0
    blobs = studio_home / "blobs"
    before = sorted(p for p in blobs.rglob("*") if p.is_file())
    capsys.readouterr()
    hit = _disk_full_under(monkeypatch, blobs)
    assert main(["adapters", "import", str(_tiny_lora(tmp_path / "b.safetensors", 2)), "--name", "style"]) == 2
    err = capsys.readouterr().err
    assert hit and err.count("\n") == 1 and "Traceback" not in err
    assert "disk is full" in err and str(blobs) in err and "lora-studio gc" in err
    assert sorted(p for p in blobs.rglob("*") if p.is_file()) == before  # no partial blob, no temporary file
    assert _leftovers(blobs) == []
    monkeypatch.undo()
    with Registry() as reg:
        assert [v.ref for v in reg.versions("style")] == ["style@1"]
        assert reg.store.verify(reg.get("style@1").weights_sha256) and reg.check() == []


def test_a_full_disk_during_a_checkpoint_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    import torch

    from studio.core.errors import DiskFullError
    from trainer.loop import list_checkpoints, load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    adapter = {"w": torch.arange(6.0).reshape(2, 3)}
    optimizer = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 3)}},
                 "param_groups": [{"lr": 1e-3, "params": [0]}]}
    save_checkpoint(run, 1, adapter=adapter, optimizer_state=optimizer, state={"step": 1})
    _disk_full_under(monkeypatch, run, only="checkpoint-000002")
    with pytest.raises(DiskFullError, match="lora-studio gc") as err:
        save_checkpoint(run, 2, adapter={"w": adapter["w"] * 2}, optimizer_state=optimizer, state={"step": 2})
    assert err.value.folder == str(run / "checkpoints")
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000001"]
    assert _leftovers(run) == []  # the temporary checkpoint folder is gone
    loaded, _, state = load_checkpoint(run / "checkpoints" / "checkpoint-000001")
    assert torch.equal(loaded["w"], adapter["w"]) and state == {"step": 1}


def test_a_training_run_that_fills_the_disk_fails_clearly_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    from pathlib import Path

    from studio.core.errors import DiskFullError
    from trainer.config import TrainConfig
    from trainer.events import run_state
    from trainer.loop import list_checkpoints, load_checkpoint, train

    root = Path(__file__).resolve().parent.parent
    # The smallest run that saves two checkpoints: 3 steps of batch 1 at 32 px, one checkpoint a step.
    cfg = TrainConfig.from_toml(root / "datasets" / "outlined_txt" / "train.toml").apply_overrides([
        f"output.dir={tmp_path / 'runs'}", "validation.every_n_steps=0", "validation.prompts=[]",
        "training.lr_warmup_steps=0", "training.max_train_steps=3", "training.train_batch_size=1",
        "output.checkpointing_steps=1", "output.checkpoints_total_limit=0"])
    run = tmp_path / "runs" / "full"
    _disk_full_under(monkeypatch, run, only="checkpoint-000002")
    with pytest.raises(DiskFullError):
        train(cfg, run_dir=run, register=False, console=False)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000001"]
    assert _leftovers(run / "checkpoints") == []
    load_checkpoint(run / "checkpoints" / "checkpoint-000001")  # complete and readable
    state = run_state(run)
    assert state.state == "failed" and "disk is full" in state.message and "lora-studio gc" in state.message


def test_a_full_disk_during_a_png_write_leaves_no_partial_image(studio_home, tmp_path, monkeypatch, capsys):
    from studio.app.cli import main

    out = tmp_path / "out"
    prompt = "a red circle on a blue background"
    assert main(["generate", prompt, "--seed", "1", "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(first) == 1
    capsys.readouterr()
    _disk_full_under(monkeypatch, out)
    assert main(["generate", prompt, "--seed", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk is full" in err and str(out) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the earlier image intact, nothing else


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_full_disk_during_an_adapter_export_keeps_the_old_file(tmp_path, monkeypatch, fmt):
    from adapters.formats import read_adapter, to_diffusers, to_kohya
    from studio.core.errors import DiskFullError

    write = to_diffusers if fmt == "diffusers" else functools.partial(to_kohya, family="sd1")
    adapter = read_adapter(_tiny_lora(tmp_path / "lora.safetensors", 1))
    out_dir = tmp_path / "out"
    out = write(adapter, out_dir / "style.safetensors")
    before = out.read_bytes()
    hit = _disk_full_under(monkeypatch, out_dir)
    with pytest.raises(DiskFullError, match="disk is full") as err:
        write(read_adapter(_tiny_lora(tmp_path / "other.safetensors", 2)), out)
    assert hit and err.value.folder == str(out_dir)
    assert out.read_bytes() == before and _leftovers(out_dir) == []  # the old export intact, nothing partial


def test_a_full_disk_during_a_single_file_export_leaves_no_partial_file(tmp_path, monkeypatch):
    from studio.core.base_models import export_single_file
    from studio.core.errors import DiskFullError

    out_dir = tmp_path / "models"
    hit = _disk_full_under(monkeypatch, out_dir)
    with pytest.raises(DiskFullError, match="lora-studio gc") as err:
        export_single_file("tiny", out_dir / "tiny.safetensors")
    assert hit and err.value.folder == str(out_dir)
    assert list(out_dir.iterdir()) == []  # no model file, no temporary file


def test_jsonable_makes_any_record_json_ready():
    import enum
    import json

    from studio.core.jsonutil import jsonable

    class Kind(enum.Enum):  # peft's PeftType is an enum like this one
        LORA = "LORA"

    value = {"loss": float("nan"), "best": float("-inf"), 3: ("a", {"b"}), "kind": Kind.LORA,
             "modules": {"to_v", "to_q"}, "nested": [{"r": 4.0}]}
    clean = jsonable(value)
    assert clean == {"loss": None, "best": None, "3": ["a", ["b"]], "kind": "LORA", "modules": ["to_q", "to_v"],
                     "nested": [{"r": 4.0}]}
    assert type(clean["kind"]) is str and json.loads(json.dumps(clean, allow_nan=False)) == clean
