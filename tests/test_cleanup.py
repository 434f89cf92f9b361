"""``lora-studio gc`` (studio.app.cleanup) on a real studio home: a registry with versions and samples, the
blob store, caches, finished and unfinished runs, inputs pinned by recipes and outputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from adapters.registry import Registry, SampleImage, VersionInfo
from studio.app import cleanup, jobs
from studio.app.cli import main
from studio.core.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent
STRIPED = ROOT / "datasets" / "striped" / "train.toml"
OLD = time.time() - 40 * 86400  # past the default 30-day threshold


def _png(color, recipe: dict | None = None) -> bytes:
    info = PngInfo()
    if recipe is not None:
        info.add_text("lora_studio", json.dumps(recipe))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _write(path: Path, data: bytes, when: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if when is not None:
        os.utime(path, (when, when))
    return path


def _weights(path: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.randn(4, 8, generator=g),
               "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.randn(8, 4, generator=g)}, str(path))
    return path


def _run(runs: Path, name: str, status: str | None, steps: tuple[int, ...], *, finished: float = OLD,
         events_after: bool = False) -> Path:
    run = runs / name
    for step in steps:
        for f in ("adapter.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"):
            _write(run / "checkpoints" / f"checkpoint-{step:06d}" / f, b"c" * 100)
    _write(run / "adapter" / f"{name}.safetensors", b"final adapter")
    _write(run / "events.jsonl", b'{"event": "start"}\n', finished + (60 if events_after else -60))
    if status is not None:
        _write(run / "result.json", json.dumps({"status": status}).encode(), finished)
    return run


def _home(home: Path, tmp_path: Path) -> dict:
    """A studio home with something of every kind; returns what a default gc must free, by category."""
    sha = {c: hashlib.sha256(c.encode()).hexdigest() for c in "ABCD"}
    inputs = home / "inputs"
    pinned_by_sample = _write(inputs / f"{sha['A']}.png", _png((1, 0, 0)), OLD)
    pinned_by_output = _write(inputs / f"{sha['B']}.png", _png((2, 0, 0)), OLD)
    loose = _write(inputs / f"{sha['C']}.png", _png((3, 0, 0)), OLD)
    _write(inputs / f"{sha['D']}.png", _png((4, 0, 0)))  # unpinned but new: may be in use right now
    outputs = home / "outputs"
    old_output = _write(outputs / "old.png", _png((9, 9, 9), {"request": {
        "init_image": str(pinned_by_output), "init_image_sha256": sha["B"]}}), OLD)
    _write(outputs / "new.png", _png((8, 8, 8), {"request": {"prompt": "x"}}))

    with Registry() as reg:
        reg.register("keep", _weights(tmp_path / "keep.safetensors", 1), VersionInfo(
            family="sd1", samples=[SampleImage(_png((5, 5, 5)), {"request": {"init_image_sha256": sha["A"],
                                                                           "init_image": "elsewhere.png"}})]))
        reg.register("keep", _weights(tmp_path / "keep2.safetensors", 2), VersionInfo(family="sd1"))
        orphan = reg.store.put_bytes(b"bytes of a registration that never recorded them")
        stale_temp = _write(reg.store.root / "ab" / ".abcdef-x.tmp", b"half a copy", OLD)

    cache = home / "cache"
    old_entry = _write(cache / "latents" / "ab" / ("ab" * 32 + ".safetensors"), b"e" * 300, OLD)
    _write(cache / "latents" / "cd" / ("cd" * 32 + ".safetensors"), b"e" * 300)
    crashed_temp = _write(cache / "text" / "ef" / ".efef.x.tmp", b"half", time.time() - 7200)

    runs = home / "runs"
    done = _run(runs, "done", "done", (2, 4))
    done_tmp = done / "checkpoints" / ".tmp-checkpoint-000006-dead"
    done_tmp.mkdir()
    stopped = _run(runs, "stopped", "stopped", (2, 4, 6))
    _run(runs, "running", None, (2,))  # no result.json yet
    _run(runs, "resumed", "stopped", (2, 4), events_after=True)  # a resume is appending events
    _run(runs, "recent", "done", (2,), finished=time.time())
    queued = _run(runs, "queued", "stopped", (2, 4))
    jobs.submit(STRIPED, run_dir=queued, start_runner=False)  # e.g. a resume waiting in the queue

    def size(*paths):
        return sum(p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                   for p in paths)

    checkpoints = [done / "checkpoints" / "checkpoint-000002", done / "checkpoints" / "checkpoint-000004", done_tmp,
                   stopped / "checkpoints" / "checkpoint-000002", stopped / "checkpoints" / "checkpoint-000004"]
    with Registry() as reg:
        blob_paths = [reg.store.path(orphan), stale_temp]
    expected = {"blobs": blob_paths, "caches": [old_entry, crashed_temp], "checkpoints": checkpoints,
                "inputs": [loose]}
    return {"expected": {k: (sorted(map(str, v)), size(*v)) for k, v in expected.items()},
            "old_output": old_output, "pinned_by_output": pinned_by_output, "pinned_by_sample": pinned_by_sample}


def _snapshot(home: Path) -> dict:
    # logs/ is the CLI's own library log, written by every command.
    return {str(p): p.stat().st_size for p in home.rglob("*") if p.is_file() and "logs" not in p.parts}


def test_dry_run_reports_count_and_bytes_per_category_and_removes_nothing(studio_home, tmp_path, capsys):
    made = _home(studio_home, tmp_path)
    before = _snapshot(studio_home)
    assert main(["gc", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and list(report["categories"]) == ["blobs", "caches", "checkpoints", "inputs"]
    for category, (paths, size) in made["expected"].items():
        got = report["categories"][category]
        assert (sorted(got["paths"]), got["bytes"], got["count"]) == (paths, size, len(paths)), category
    assert report["bytes"] == sum(size for _, size in made["expected"].values())
    kept = "\n".join(report["kept"])
    assert "runs/running: no readable result.json" in kept and "runs/resumed: a job is training" in kept
    assert "runs/queued: a job is training" in kept and f"{made['pinned_by_output']}: pinned" in kept
    assert _snapshot(studio_home) == before

    assert main(["gc", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "checkpoints" in text and "would free" in text and "total" in text


def test_gc_frees_them_and_keeps_everything_a_version_references(studio_home, tmp_path, capsys):
    made = _home(studio_home, tmp_path)
    before = _snapshot(studio_home)
    assert main(["gc", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is False
    removed = set()
    for category, (paths, size) in made["expected"].items():
        got = report["categories"][category]
        assert (sorted(got["paths"]), got["bytes"]) == (paths, size), category
        removed.update(paths)
    after = _snapshot(studio_home)
    gone = {p for p in before if p not in after}
    assert all(any(p == r or p.startswith(r + "/") for r in removed) for p in gone)
    assert all(not Path(r).exists() for r in removed)
    with Registry() as reg:  # every version, its weights and its sample still there
        assert [v.ref for v in reg.versions("keep")] == ["keep@1", "keep@2"] and reg.check() == []
        assert all(reg.store.verify(v.weights_sha256) for v in reg.versions("keep"))
        assert reg.store.exists(reg.get("keep@1").samples[0].sha256)
    runs = studio_home / "runs"
    assert (runs / "done" / "adapter" / "done.safetensors").is_file() and (runs / "done" / "result.json").is_file()
    assert [p.name for p in (runs / "stopped" / "checkpoints").iterdir()] == ["checkpoint-000006"]  # resumable
    for name in ("running", "resumed", "queued", "recent"):
        assert len(list((runs / name / "checkpoints").iterdir())) >= 1
    assert made["pinned_by_sample"].is_file() and made["pinned_by_output"].is_file()
    assert made["old_output"].is_file()  # outputs only when named

    assert main(["gc", "--json"]) == 0  # a second pass finds nothing left
    assert json.loads(capsys.readouterr().out)["count"] == 0


def test_outputs_only_when_named_and_then_their_inputs_are_free(studio_home, tmp_path, capsys):
    made = _home(studio_home, tmp_path)
    assert main(["gc", "--category", "outputs", "--category", "inputs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["categories"]) == ["inputs", "outputs"]
    assert report["categories"]["outputs"]["paths"] == [str(made["old_output"])]
    # The only recipe that pinned this input was in the removed output.
    assert str(made["pinned_by_output"]) in report["categories"]["inputs"]["paths"]
    assert not made["pinned_by_output"].exists() and made["pinned_by_sample"].is_file()
    assert (studio_home / "outputs" / "new.png").is_file()


def test_age_threshold_and_bad_options(studio_home, tmp_path, capsys):
    made = _home(studio_home, tmp_path)
    # 100 days: nothing of 40 days is old enough; orphan blobs have no age rule.
    report = cleanup.collect(older_than_days=100, dry_run=True)
    assert report.categories["checkpoints"].count == report.categories["inputs"].count == 0
    assert report.categories["caches"].paths == [str(studio_home / "cache" / "text" / "ef" / ".efef.x.tmp")]
    assert sorted(report.categories["blobs"].paths) == made["expected"]["blobs"][0]
    with pytest.raises(InvalidRequestError, match="choose from blobs"):
        cleanup.collect(categories=["everything"])
    with pytest.raises(InvalidRequestError, match="days >= 0"):
        cleanup.collect(older_than_days=-1)
    assert main(["gc", "--older-than", "-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
