"""The adapter registry: records round-trip, references, aliases, deletes and gc, names, search,
concurrent registration across processes, kill -9 safety, and the ``lora-studio adapters`` commands.

Small real safetensors files are written with ``safetensors.torch.save_file``; torch is imported
inside the helpers only, so the spawned worker processes (which import this module) start fast.
No test asserts a wall-clock time: ``benchmarks/registry_scale.py`` measures the 10k-version query.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.registry import (
    SCHEMA_VERSION,
    AdapterVersion,
    Registry,
    SampleImage,
    VersionInfo,
    check_alias,
    check_name,
    parse_reference,
    registry_info,
    version_info_fields,
)
from studio.core.errors import (
    AdapterNotFoundError,
    AliasInUseError,
    AmbiguousReferenceError,
    CorruptWeightsError,
    InputFileNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    StudioError,
    UnsafeWeightsError,
)

ROOT = Path(__file__).resolve().parent.parent

# Every test here runs on SQLite and on a real PostgreSQL server (conftest's registry_backend).
pytestmark = pytest.mark.usefixtures("registry_backend")




def make_weights(path: Path, seed: int, *, metadata: dict | None = None, size: int = 8) -> Path:
    """A small real LoRA-shaped safetensors file whose tensors are decided by ``seed``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {
        "unet.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.randn(4, size, generator=g),
        "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.randn(size, 4, generator=g),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def register_file(reg: Registry, name: str, seed: int, tmp: Path, **info) -> AdapterVersion:
    """Register a fresh small file (the test stand-in for ``adapters import``)."""
    path = make_weights(tmp / f"{name}-{seed}.safetensors", seed)
    return reg.register(name, path, VersionInfo(**{"family": "sd1", **info}))


def _png(color=(255, 0, 0)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


# ---- records ------------------------------------------------------------------------------------


def test_every_field_round_trips_through_a_fresh_client(reg, tmp_path, studio_home):
    base = register_file(reg, "base-style", 1, tmp_path)
    other = register_file(reg, "other", 2, tmp_path)
    sample_file = tmp_path / "sample.png"
    sample_file.write_bytes(_png((0, 255, 0)))
    os.chmod(sample_file, 0o600)
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_tag_frequency": json.dumps({"x": {"a": 1}}),
            "modelspec.title": "My style"}
    weights = make_weights(tmp_path / "w.safetensors", 3, metadata=meta)
    info = VersionInfo(
        family="sd1", adapter_type="dora", rank=8, alpha=4.5,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"], components=["unet", "text_encoder"],
        trigger_words=["mystyle", "a photo of sks dog"], description="Watercolour look, soft edges",
        tags=["watercolour", "Style"], license="openrail++", author="Ada",
        base_model="runwayml/stable-diffusion-v1-5", base_model_sha256="0123abcdef",
        training_config={"rank": 8, "learning_rate": 1e-4, "optimizer": {"name": "adamw8bit"}},
        dataset_fingerprint="sha256:feedface", origin="merged",
        source={"tool": "lora-studio", "weights": [0.7, 0.3]}, parents=["base-style@1", "other"],
        metrics={"val_loss": 0.125, "steps": 500}, weights_format="peft",
        samples=[SampleImage(_png(), {"prompt": "mystyle, a cat", "seed": 1}),
                 SampleImage(sample_file, {"prompt": "mystyle, a dog", "seed": 2})],
    )
    made = reg.register("my-style", weights, info)
    reg.close()

    with Registry() as fresh:
        v = fresh.get("my-style@1")
    assert v == made
    assert (v.name, v.number, v.ref, v.aliases) == ("my-style", 1, "my-style@1", ("latest",))
    for option in version_info_fields():
        if option in ("parents", "samples"):
            continue
        got, want = getattr(v, option), getattr(info, option)
        assert (list(got) if isinstance(got, tuple) else got) == want, option
    assert isinstance(v.alpha, float)
    assert [(p.name, p.number, p.sha256, p.present) for p in v.parents] == [
        ("base-style", 1, base.weights_sha256, True), ("other", 1, other.weights_sha256, True)]
    assert [s.recipe for s in v.samples] == [s.recipe for s in info.samples]
    assert v.samples[0].path.read_bytes() == _png() and v.samples[1].path.read_bytes() == sample_file.read_bytes()
    assert all(oct(s.path.stat().st_mode)[-3:] == "644" for s in v.samples)
    from studio.core.hashing import hash_weights

    header, hashes = hash_weights(weights)
    assert (v.weights_sha256, v.tensor_sha256, v.autov2, v.a1111_legacy, v.size_bytes) == (
        hashes.sha256, hashes.tensor_sha256, hashes.autov2, hashes.a1111_legacy, hashes.size_bytes)
    assert v.safetensors_metadata == meta == header.metadata
    assert v.path == studio_home / "blobs" / v.weights_sha256[:2] / v.weights_sha256
    assert v.path.read_bytes() == weights.read_bytes()
    assert v.created_at.tzinfo is not None and abs(time.time() - v.created_at.timestamp()) < 600
    d = json.loads(json.dumps(v.to_dict()))
    assert d["ref"] == "my-style@1" and d["parents"][0]["ref"] == "base-style@1"
    assert d["training_config"] == info.training_config and d["samples"][1]["recipe"]["seed"] == 2
    assert [c.ref for c in reg.children("base-style")] == ["my-style@1"]


def test_versions_are_numbered_per_name_and_never_reused(reg, tmp_path):
    assert [register_file(reg, "a", s, tmp_path).number for s in range(3)] == [1, 2, 3]
    assert register_file(reg, "b", 10, tmp_path).number == 1
    assert reg.get("a").number == 3 and reg.get("a@latest").number == 3
    reg.delete("a@3")
    assert reg.get("a").number == 2 and reg.adapter("a").aliases == {"latest": 2}
    # The counter remembers 3: name@3 never comes to mean different weights.
    assert register_file(reg, "a", 3, tmp_path).number == 4
    reg.delete("a@2")
    assert reg.adapter("a").versions == (1, 4) and reg.get("a").number == 4
    reg.delete("a@4")
    assert reg.get("a").number == 1 and reg.get("a").aliases == ("latest",)
    assert reg.check() == []


def test_identical_tensors_under_the_same_name_return_the_existing_version(reg, tmp_path, studio_home):
    first = reg.register("dup", make_weights(tmp_path / "1.safetensors", 7), VersionInfo(family="sd1"))
    # Same tensors, different metadata: a different file, the same tensor-only hash.
    edited = make_weights(tmp_path / "2.safetensors", 7, metadata={"modelspec.title": "renamed"})
    again = reg.register("dup", edited, VersionInfo(family="sd1", description="ignored"))
    assert again == first and reg.adapter("dup").versions == (1,)
    assert again.weights_sha256 != __import__("studio.core.hashing").core.hashing.file_sha256(edited)
    assert sorted(p.name for p in (studio_home / "blobs").rglob("*") if p.is_file()) == [first.weights_sha256]
    # Under another name the same file is a new adapter, sharing the blob.
    twin = reg.register("dup-twin", tmp_path / "1.safetensors", VersionInfo(family="sd1"))
    assert twin.ref == "dup-twin@1" and twin.weights_sha256 == first.weights_sha256


# ---- references ---------------------------------------------------------------------------------


def test_references_of_every_form(reg, tmp_path):
    v1 = register_file(reg, "ref-test", 1, tmp_path)
    v2 = register_file(reg, "ref-test", 2, tmp_path)
    reg.set_alias("ref-test@1", "prod")
    assert reg.get("ref-test").ref == "ref-test@2"
    assert reg.get("ref-test@latest").ref == "ref-test@2"
    assert reg.get("ref-test@1").ref == "ref-test@1"
    assert reg.get("ref-test@prod").ref == "ref-test@1"
    for prefix in (v1.weights_sha256[:8], v1.weights_sha256[:8].upper(), v1.autov2, v1.weights_sha256):
        assert reg.get(f"sha256:{prefix}").ref == "ref-test@1"
    assert reg.get(f"SHA256:{v2.weights_sha256[:12]}").ref == "ref-test@2"
    assert parse_reference("x@007").number == 7


def test_unknown_references_name_the_candidates(reg, tmp_path):
    register_file(reg, "watercolor", 1, tmp_path)
    register_file(reg, "watercolor", 2, tmp_path)
    register_file(reg, "watercolor-v2", 3, tmp_path)
    reg.set_alias("watercolor@1", "prod")
    with pytest.raises(AdapterNotFoundError) as err:
        reg.get("watercolour")
    assert isinstance(err.value, KeyError) and isinstance(err.value, StudioError)
    assert "watercolor" in err.value.candidates and "did you mean" in str(err.value)
    assert not str(err.value).startswith("'")  # one readable line, not KeyError's repr
    with pytest.raises(KeyError) as err:
        reg.get("watercolor@9")
    assert err.value.candidates == ["watercolor@1", "watercolor@2", "watercolor@latest", "watercolor@prod"]
    assert "has no version 9" in str(err.value)
    with pytest.raises(AdapterNotFoundError, match="has no alias 'staging'") as err:
        reg.get("watercolor@staging")
    assert "watercolor@prod" in err.value.candidates
    with pytest.raises(AdapterNotFoundError, match="starting with 00000000"):
        reg.get("sha256:00000000")
    with pytest.raises(AdapterNotFoundError) as err:
        reg.get("zzzz")
    assert err.value.candidates == [] and "adapters list" in str(err.value)


def test_an_ambiguous_hash_prefix_lists_the_matches(reg, tmp_path):
    path = make_weights(tmp_path / "shared.safetensors", 5)
    a = reg.register("left", path, VersionInfo(family="sd1"))
    reg.register("right", path, VersionInfo(family="sd1"))
    with pytest.raises(AmbiguousReferenceError) as err:
        reg.get(f"sha256:{a.weights_sha256[:8]}")
    assert isinstance(err.value, LookupError)
    assert [c.split()[0] for c in err.value.candidates] == ["left@1", "right@1"]
    assert "longer hash" in str(err.value)


def test_malformed_references_are_refused():
    for bad in ("", "sha256:1234567", "sha256:xyz12345", "sha256:" + "a" * 65, "a@", "@3", "a@0", "a@b@c",
                "../x@1", "a/b", "a@-1", "a@ 1"):
        with pytest.raises(InvalidNameError):
            parse_reference(bad)


# ---- names and aliases ----------------------------------------------------------------------------


def test_name_validation(reg, tmp_path, studio_home):
    for good in ("a", "A", "0", "my-style_v1.2", "x" * 64, "_under", "v1..2", "sd1.5-lora"):
        assert check_name(good) == good
    path = make_weights(tmp_path / "w.safetensors", 1)
    for bad in ("../x", "a/b", "a\\b", "", ".hidden", ".", "..", "-dash", "x" * 65, "a b", "a@b", "a:b", "x\n",
                "t\tab", "ünïcode", "/abs", "a\x00b", None, 3):
        with pytest.raises(InvalidNameError) as err:
            reg.register(bad, path, VersionInfo(family="sd1"))
        assert isinstance(err.value, ValueError)
    assert not (studio_home / "blobs").exists()  # refused before anything was stored
    assert "x" * 100 not in str(pytest.raises(InvalidNameError, check_name, "x" * 5000).value)  # shown shortened


def test_alias_rules(reg, tmp_path):
    register_file(reg, "al", 1, tmp_path)
    register_file(reg, "al", 2, tmp_path)
    for bad in ("3", "007", "latest", "../prod", "a/b", "", ".x"):
        with pytest.raises(InvalidNameError):
            reg.set_alias("al@1", bad)
    with pytest.raises(InvalidNameError, match="automatically"):
        reg.remove_alias("al", "latest")
    assert check_alias("v2-candidate") == "v2-candidate"
    assert reg.set_alias("al@1", "prod").aliases == ("prod",)
    moved = reg.set_alias("al@2", "prod")  # aliases move
    assert moved.aliases == ("latest", "prod") and reg.get("al@1").aliases == ()
    reg.set_alias("al@prod", "stable")  # a reference through an alias
    assert reg.adapter("al").aliases == {"latest": 2, "prod": 2, "stable": 2}
    assert reg.remove_alias("al", "prod") == 2
    with pytest.raises(AdapterNotFoundError) as err:
        reg.remove_alias("al", "prod")
    assert "al@stable" in err.value.candidates
    register_file(reg, "other", 3, tmp_path)
    reg.set_alias("other", "prod")  # aliases belong to one adapter: no clash across names
    assert reg.get("al@stable").ref == "al@2" and reg.get("other@prod").ref == "other@1"


# ---- deletes and garbage collection ---------------------------------------------------------------


def test_delete_refuses_aliased_versions_unless_forced(reg, tmp_path):
    register_file(reg, "d", 1, tmp_path)
    register_file(reg, "d", 2, tmp_path)
    reg.set_alias("d@1", "prod")
    with pytest.raises(AliasInUseError) as err:
        reg.delete("d@prod")
    assert err.value.aliases == ["d@prod"] and isinstance(err.value, ValueError)
    assert reg.adapter("d").versions == (1, 2)  # nothing happened
    reg.delete("d@2")  # 'latest' never protects a version
    assert reg.get("d").ref == "d@1" and reg.get("d").aliases == ("latest", "prod")
    with pytest.raises(AliasInUseError):
        reg.delete("d")  # the whole adapter
    report = reg.delete("d@1", force=True)
    assert report.deleted == ("d@1",) and report.aliases_removed == ("d@prod",)
    with pytest.raises(AdapterNotFoundError):
        reg.adapter("d")  # the last version took the adapter with it
    assert reg.check() == []


def test_delete_adapter_removes_every_version_and_frees_only_unshared_blobs(reg, tmp_path, studio_home):
    shared = make_weights(tmp_path / "shared.safetensors", 9)
    keep = reg.register("keeper", shared, VersionInfo(family="sd1", samples=[SampleImage(_png(), {})]))
    reg.register("doomed", shared, VersionInfo(family="sd1", samples=[SampleImage(_png(), {})]))
    own = register_file(reg, "doomed", 10, tmp_path)
    reg.set_alias("doomed@1", "prod")
    report = reg.delete("doomed", force=True)
    assert report.deleted == ("doomed@1", "doomed@2") and report.aliases_removed == ("doomed@prod",)
    assert report.blobs_removed == (own.weights_sha256,) and report.bytes_freed == own.size_bytes
    assert keep.path.exists() and keep.samples[0].path.exists() and not own.path.exists()
    reg.delete("keeper")
    blobs = [p for p in (studio_home / "blobs").rglob("*") if p.is_file()]
    assert blobs == [] and reg.check() == []


def test_lineage_survives_the_parents_delete(reg, tmp_path):
    register_file(reg, "parent", 1, tmp_path)
    child = register_file(reg, "child", 2, tmp_path, parents=["parent@1"], origin="trained")
    reg.delete("parent@1")
    again = reg.get("child")
    assert [(p.ref, p.sha256, p.present) for p in again.parents] == [
        ("parent@1", child.parents[0].sha256, False)]
    with pytest.raises(AdapterNotFoundError):
        register_file(reg, "child", 3, tmp_path, parents=["parent@1"])
    with pytest.raises(InvalidRequestError, match="same version twice"):
        register_file(reg, "child", 4, tmp_path, parents=["child@1", "child"])


def test_gc_removes_orphans_and_stale_temp_files(reg, tmp_path):
    kept = register_file(reg, "gc", 1, tmp_path)
    orphan = reg.store.put_bytes(b"stored by a registration that was killed before its commit")
    folder = reg.store.path(orphan).parent
    young, old = folder / ".young.tmp", folder / ".old.tmp"
    young.write_bytes(b"copy in flight")
    old.write_bytes(b"copy that crashed")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    report = reg.gc()
    assert report.blobs_removed == (orphan,) and report.temp_files_removed == 1
    assert not reg.store.exists(orphan) and young.exists() and not old.exists()
    assert reg.store.exists(kept.weights_sha256) and reg.gc().blobs_removed == ()


def test_a_blob_collected_between_put_and_commit_is_stored_again(reg, tmp_path, monkeypatch):
    # What a gc() in another process could do while this registration is between its blob write and
    # its transaction: remove the freshly stored, not yet referenced file.
    real_put = reg.store.put_file

    def put_then_lose(source, *, sha256=None):
        sha = real_put(source, sha256=sha256)
        monkeypatch.setattr(reg.store, "put_file", real_put)  # only the first put is lost
        reg.gc()
        assert not reg.store.exists(sha)
        return sha

    monkeypatch.setattr(reg.store, "put_file", put_then_lose)
    v = register_file(reg, "raced", 1, tmp_path)
    assert v.path.exists() and reg.store.verify(v.weights_sha256) and reg.check() == []


def test_check_reports_a_missing_blob(reg, tmp_path):
    v = register_file(reg, "broken", 1, tmp_path)
    reg.store.delete(v.weights_sha256)
    assert reg.check() == [f"broken@1: weights blob {v.weights_sha256} is missing"]


# ---- what register refuses ------------------------------------------------------------------------


def test_register_refuses_pickles_damaged_and_missing_files(reg, tmp_path, studio_home):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"not even looked at")
    with pytest.raises(UnsafeWeightsError):
        reg.register("x", ckpt, VersionInfo(family="sd1"))
    damaged = tmp_path / "d.safetensors"
    damaged.write_bytes(make_weights(tmp_path / "ok.safetensors", 1).read_bytes()[:-7])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        reg.register("x", damaged, VersionInfo(family="sd1"))
    with pytest.raises(InputFileNotFoundError):
        reg.register("x", tmp_path / "missing.safetensors", VersionInfo(family="sd1"))
    with pytest.raises(InputFileNotFoundError):
        reg.register("x", tmp_path / "ok.safetensors",
                     VersionInfo(family="sd1", samples=[SampleImage(tmp_path / "no.png", {})]))
    with pytest.raises(InvalidRequestError):
        reg.register("x", tmp_path / "ok.safetensors", {"family": "sd1"})
    assert reg.list_versions().total == 0
    reg.gc()
    assert not [p for p in (studio_home / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("option, value, message", [
    ("family", "SD 1", "family"),
    ("adapter_type", "locon", "adapter_type"),
    ("origin", "downloaded", "origin"),
    ("rank", 0, "rank"),
    ("rank", True, "rank"),
    ("alpha", float("nan"), "alpha"),
    ("alpha", -1, "alpha"),
    ("tags", "anime", "tags"),
    ("tags", ["anime", "Anime"], "duplicates"),
    ("trigger_words", [" padded "], "trigger_words"),
    ("components", ["vae"], "components"),
    ("metrics", {"loss": float("nan")}, "metrics"),
    ("training_config", [1, 2], "training_config"),
    ("source", {"when": object()}, "source"),
    ("base_model_sha256", "xyz", "base_model_sha256"),
    ("weights_format", "Kohya SS", "weights_format"),
    ("samples", [b"png"], "samples"),
])
def test_version_info_names_the_offending_option(option, value, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        VersionInfo(**{"family": "sd1", option: value})
    assert f"VersionInfo.{option}" in str(err.value) or "SampleImage" in str(err.value)


def test_version_info_fields_carry_help_text():
    helps = version_info_fields()
    assert helps["rank"] and helps["trigger_words"] and all(helps.values())


# ---- search, filters, sort, pages -----------------------------------------------------------------


@pytest.fixture
def catalog(reg, tmp_path):
    specs = [
        ("anime-eyes", dict(tags=["anime", "eyes"], trigger_words=["AnimeEyes"], adapter_type="lora",
                            description="Big sparkly eyes")),
        ("anime-eyes", dict(tags=["anime"], trigger_words=["AnimeEyes"], adapter_type="dora",
                            description="Big sparkly eyes, v2")),
        ("watercolor", dict(tags=["style"], trigger_words=["wtrclr"], description="soft 100% paper_texture")),
        ("xl-light", dict(family="sdxl", tags=["lighting", "Anime"], adapter_type="lokr",
                          description="Cinematic light")),
        ("zebra", dict(tags=["animal"], adapter_type="loha", description="stripes everywhere")),
    ]
    made = [register_file(reg, name, seed, tmp_path, **info) for seed, (name, info) in enumerate(specs)]
    return reg, made


def _refs(page):
    return [v.ref for v in page.items]


def test_filters(catalog):
    reg, _ = catalog
    assert _refs(reg.list_versions(tag="ANIME")) == ["anime-eyes@1", "anime-eyes@2", "xl-light@1"]
    assert _refs(reg.list_versions(family="sdxl")) == ["xl-light@1"]
    assert _refs(reg.list_versions(trigger="animeeyes")) == ["anime-eyes@1", "anime-eyes@2"]
    assert _refs(reg.list_versions(adapter_type="loha")) == ["zebra@1"]
    assert _refs(reg.list_versions(search="sparkly")) == ["anime-eyes@1", "anime-eyes@2"]
    assert _refs(reg.list_versions(search="EYES v2")) == ["anime-eyes@2"]  # every word must match
    assert _refs(reg.list_versions(search="zeb")) == ["zebra@1"]  # the name is searched too
    assert _refs(reg.list_versions(search="100%")) == ["watercolor@1"]  # % and _ are literal
    assert _refs(reg.list_versions(search="%")) == ["watercolor@1"]
    assert _refs(reg.list_versions(search="paper_t")) == ["watercolor@1"]
    assert _refs(reg.list_versions(tag="anime", family="sd1", adapter_type="dora")) == ["anime-eyes@2"]
    assert _refs(reg.list_versions(name="anime-eyes")) == ["anime-eyes@1", "anime-eyes@2"]
    assert _refs(reg.list_versions(latest_only=True, tag="anime")) == ["anime-eyes@2", "xl-light@1"]
    assert reg.list_versions(tag="nope").total == 0
    assert [v.ref for v in reg.versions("anime-eyes")] == ["anime-eyes@1", "anime-eyes@2"]
    with pytest.raises(InvalidRequestError):
        reg.list_versions(adapter_type="locon")


def test_sort_and_pages(catalog):
    reg, made = catalog
    by_name = ["anime-eyes@1", "anime-eyes@2", "watercolor@1", "xl-light@1", "zebra@1"]
    assert _refs(reg.list_versions(sort="name")) == by_name
    assert _refs(reg.list_versions(sort="created")) == [v.ref for v in made]
    assert _refs(reg.list_versions(sort="newest")) == [v.ref for v in reversed(made)]
    first = reg.list_versions(limit=2)
    second = reg.list_versions(limit=2, offset=2)
    last = reg.list_versions(limit=2, offset=4)
    assert (first.total, second.total, last.total) == (5, 5, 5)
    assert _refs(first) + _refs(second) + _refs(last) == by_name
    assert first.has_more and not last.has_more
    assert reg.list_versions(limit=0).items == () and reg.list_versions(limit=0).total == 5
    assert len(reg.list_versions(limit=None).items) == 5
    assert reg.list_versions(offset=10).items == ()
    for bad in (dict(sort="size"), dict(limit=-1), dict(offset=-1)):
        with pytest.raises(InvalidRequestError):
            reg.list_versions(**bad)
    page = json.loads(json.dumps(reg.list_versions(limit=1).to_dict()))
    assert page["total"] == 5 and page["items"][0]["ref"] == "anime-eyes@1"


# ---- database settings ----------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_sqlite_file_uses_wal_and_a_busy_timeout(reg, studio_home):
    db = studio_home / "registry.db"
    assert db.exists()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    with reg._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


@pytest.mark.sqlite_only
def test_registry_url_comes_from_the_environment(tmp_path, monkeypatch, studio_home):
    from studio.core.settings import reload_settings

    other = tmp_path / "elsewhere" / "catalog.db"
    monkeypatch.setenv("LORA_STUDIO_REGISTRY_URL", f"sqlite:///{other}")
    reload_settings()
    with Registry() as r:
        register_file(r, "moved", 1, tmp_path)
    assert other.exists() and not (studio_home / "registry.db").exists()
    assert (studio_home / "blobs").is_dir()  # blobs stay in the home


def test_a_newer_schema_is_refused(reg, studio_home):
    import sqlalchemy as sa

    with reg._engine.begin() as conn:
        conn.execute(sa.update(registry_info).values(value=str(SCHEMA_VERSION + 1)))
    with pytest.raises(StudioError, match="newer LoRA Studio"):
        Registry()


# ---- several processes at once --------------------------------------------------------------------

WORKERS = 8
PER_WORKER = 50
NAMES = ("alpha", "beta", "gamma")


def _register_worker(home: str, jobs: list, barrier, results) -> None:
    """Runs in a spawned process: register every (name, path) in ``jobs`` as fast as possible."""
    from adapters.registry import Registry, VersionInfo

    try:
        reg = Registry(home=home)
        barrier.wait(timeout=120)  # every worker starts registering at the same moment
        out = []
        for name, path in jobs:
            v = reg.register(name, path, VersionInfo(family="sd1"))
            out.append((name, v.number, v.weights_sha256))
        reg.close()
        results.put(out)
    except BaseException as e:  # report instead of dying silently, so the test fails at once with the reason
        results.put(f"worker failed: {e!r}")


def _collect(procs, results, *, deadline_s: float) -> list:
    """One outcome per worker; fails at once, naming the exit codes, when a worker died without reporting,
    and names the workers still running when the deadline passes (a slow machine vs a stuck lock)."""
    import queue
    import time

    outcomes, start = [], time.monotonic()
    while len(outcomes) < len(procs):
        try:
            outcomes.append(results.get(timeout=5))
            continue
        except queue.Empty:
            pass
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        assert not dead, f"{len(dead)} worker(s) died without reporting, exit codes {dead}"
        elapsed = time.monotonic() - start
        assert elapsed < deadline_s, (f"{len(outcomes)} of {len(procs)} workers reported in {elapsed:.0f} s; "
                                      f"alive: {[p.pid for p in procs if p.is_alive()]}")
    return outcomes


def test_concurrent_processes_never_lose_or_duplicate_a_number(reg, tmp_path, studio_home):
    # 8 processes x 50 registrations, all 400 files distinct, over 3 names so every counter is contended.
    jobs = [[(NAMES[(w + i) % len(NAMES)], str(make_weights(tmp_path / f"w{w}-{i}.safetensors", 1000 * w + i,
                                                            size=4)))
             for i in range(PER_WORKER)] for w in range(WORKERS)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_register_worker, args=(str(studio_home), jobs[w], barrier, results))
             for w in range(WORKERS)]
    for p in procs:
        p.start()
    outcomes = _collect(procs, results, deadline_s=600)
    assert not [o for o in outcomes if isinstance(o, str)], outcomes
    got = [row for rows in outcomes for row in rows]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(got) == WORKERS * PER_WORKER
    for name in NAMES:
        numbers = sorted(n for nm, n, _ in got if nm == name)
        assert numbers == list(range(1, len(numbers) + 1)), name  # no gap, no duplicate
        assert reg.adapter(name).versions == tuple(numbers)
        assert reg.get(name).number == numbers[-1]  # latest is the highest
    in_db = {(v.name, v.number, v.weights_sha256) for v in reg.list_versions(limit=None).items}
    assert in_db == set(got)
    assert reg.check() == []


# ---- kill -9 in the middle of a registration ------------------------------------------------------

# Runs in a child process. The pause is patched in here, in the child: the library has no test hooks.
_KILLED_CHILD = r"""
import sys, time
from pathlib import Path
from adapters.registry import Registry, VersionInfo
from adapters.store import BlobStore

point, weights, marker = sys.argv[1:4]
if point == "after-blob":
    real = BlobStore.put_file
    def put_then_pause(self, *args, **kwargs):
        sha = real(self, *args, **kwargs)
        Path(marker).write_text(sha)
        time.sleep(600)
    BlobStore.put_file = put_then_pause
else:  # "before-commit": every row of the version is written, the transaction is still open
    real = Registry._point_latest
    def point_then_pause(self, conn, adapter_id):
        real(self, conn, adapter_id)
        Path(marker).write_text("in transaction")
        time.sleep(600)
    Registry._point_latest = point_then_pause
Registry().register("victim", weights, VersionInfo(family="sd1", tags=["t"], trigger_words=["w"]))
"""


@pytest.mark.parametrize("point", ["after-blob", "before-commit"])
def test_kill_9_during_register_leaves_no_half_version(reg, tmp_path, studio_home, point):
    register_file(reg, "victim", 1, tmp_path)
    weights = make_weights(tmp_path / "second.safetensors", 2)
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, point, str(weights), str(marker)], cwd=ROOT,
                             env={**os.environ, "LORA_STUDIO_HOME": str(studio_home)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the child exited before reaching the kill point"
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    with Registry() as after:  # the dead writer's lock is gone and its rows never happened
        assert after.adapter("victim").versions == (1,)
        assert after.get("victim").number == 1 and after.list_versions(tag="t").total == 0
        assert after.check() == []
        from studio.core.hashing import file_sha256

        sha = file_sha256(weights)
        assert after.store.exists(sha)  # the blob was written first ...
        assert after.gc().blobs_removed == (sha,)  # ... and nothing referenced it
        assert after.register("victim", weights, VersionInfo(family="sd1")).number == 2  # no gap, no reuse
        assert after.check() == []


# ---- the lora-studio adapters commands ------------------------------------------------------------


def test_cli_list_show_tag_untag_delete(reg, tmp_path, capsys):
    from studio.app.cli import main

    register_file(reg, "cli-style", 1, tmp_path, tags=["anime"], trigger_words=["clistyle"], rank=4)
    register_file(reg, "cli-style", 2, tmp_path, tags=["anime"], rank=8)
    register_file(reg, "other", 3, tmp_path, family="sdxl", adapter_type="lokr")
    capsys.readouterr()

    assert main(["adapters", "list", "--tag", "anime", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["total"] == 2 and [i["ref"] for i in page["items"]] == ["cli-style@1", "cli-style@2"]
    assert main(["adapters", "list", "--family", "sdxl", "--type", "lokr"]) == 0
    out = capsys.readouterr().out
    assert "other@1" in out and "cli-style" not in out and "showing 1-1 of 1" in out
    assert main(["adapters", "list", "--search", "cli", "--trigger", "CLISTYLE", "--limit", "1", "--offset", "0",
                 "--sort", "newest"]) == 0
    assert "cli-style@1" in capsys.readouterr().out
    assert main(["adapters", "list", "--limit", "1", "--offset", "1", "--json"]) == 0
    assert [i["ref"] for i in json.loads(capsys.readouterr().out)["items"]] == ["cli-style@2"]

    assert main(["adapters", "show", "cli-style", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ref"] == "cli-style@2" and shown["rank"] == 8
    assert main(["adapters", "show", "cli-style@1"]) == 0
    out = capsys.readouterr().out
    assert "cli-style@1" in out and "clistyle" in out and "AutoV2" in out

    assert main(["adapters", "tag", "cli-style@1", "prod"]) == 0
    assert capsys.readouterr().out.strip() == "cli-style@prod -> cli-style@1"
    assert main(["adapters", "delete", "cli-style@prod"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["adapters", "untag", "cli-style", "prod"]) == 0
    assert "was cli-style@1" in capsys.readouterr().out
    assert main(["adapters", "delete", "cli-style@1"]) == 0
    assert "deleted cli-style@1" in capsys.readouterr().out
    assert main(["adapters", "delete", "other"]) == 0
    assert reg.list_versions().total == 1


def _run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "studio.app.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def test_cli_errors_are_one_line_exit_2(reg, tmp_path, studio_home):
    register_file(reg, "solo", 1, tmp_path)
    reg.set_alias("solo", "prod")
    env = {**os.environ, "LORA_STUDIO_HOME": str(studio_home)}
    cases = [
        (["adapters", "show", "sol"], "did you mean: solo"),
        (["adapters", "show", "solo@7"], "solo@1"),
        (["adapters", "show", "../etc"], "not a valid adapter name"),
        (["adapters", "show", "sha256:12"], "hex digits"),
        (["adapters", "tag", "solo", "42"], "cannot be a number"),
        (["adapters", "untag", "solo", "latest"], "automatically"),
        (["adapters", "delete", "solo"], "--force"),
        (["adapters", "list", "--limit", "x"], "not a whole number"),
    ]
    for argv, message in cases:
        proc = _run_cli(*argv, env=env)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
