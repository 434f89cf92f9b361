"""The one ingest path: import, Hub pull, merge and training all register through ``adapters.ingest.ingest``.

Proved without patching anything: a pulled file made for another architecture is refused by the import's
pre-check with the import's message, and versions of all four origins carry the metadata ingest writes.
"""

from __future__ import annotations

import json

import pytest
from test_hub import TOKEN, _save_lora, hub  # noqa: F401 - hub is the local Hub fixture
from test_trainer import _config

from adapters import formats
from adapters.ingest import IngestResult, import_adapter, ingest
from adapters.merge import merge_adapters
from studio.app import hub as studio_hub
from studio.core.errors import IncompatibleAdapterError
from studio.core.hashing import tensor_sha256
from trainer.loop import train


def _sdxl_file(path):
    """Keys of a second text encoder: SDXL, whatever the shapes (made small, since only the keys matter)."""
    import torch
    from safetensors.torch import save_file

    q = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": torch.zeros(4, 64), f"{q}.lora_B.weight": torch.zeros(64, 4)}, str(path))
    return path


def test_a_pull_is_refused_by_the_import_pre_check_with_the_same_message(reg, hub, tmp_path):  # noqa: F811
    made = _sdxl_file(tmp_path / "sdxl.safetensors")
    with pytest.raises(IncompatibleAdapterError) as imported:
        import_adapter(reg, made, name="xl")
    hub.put_files("alice/xl", {"pytorch_lora_weights.safetensors": made.read_bytes()})
    with pytest.raises(IncompatibleAdapterError) as pulled:
        studio_hub.pull_adapter(reg, "alice/xl", token=TOKEN)
    # The message names the file first (a local path, a download); the rest is the one pre-check's sentence.
    theirs, ours = (str(e.value).split(": ", 1)[1] for e in (pulled, imported))
    assert theirs == ours and "made for SDXL" in ours and "second text encoder" in ours
    assert pulled.value.architecture == imported.value.architecture == "sdxl"
    assert not reg.list_versions(limit=None).items


def test_ingest_reports_detection_and_returns_the_existing_version_for_the_same_tensors(reg, tmp_path):
    made = _save_lora(tmp_path, seed=31)
    info = formats.detect(made)
    first = ingest(reg, made, name="direct", origin="imported", base="tiny", trigger_words=[" zkq "],
                   source_info={"note": "a test"})
    assert isinstance(first, IngestResult) and first.created and first.ref == "direct@1"
    assert first.detected.format == info.format and first.warnings == tuple(info.warnings)
    assert first.version.trigger_words == ("zkq",) and first.version.source == {"note": "a test"}
    again = ingest(reg, made, name="direct", origin="imported", base="tiny", detected=info)
    assert not again.created and again.ref == "direct@1"


def test_imported_pulled_merged_and_trained_versions_carry_the_metadata_ingest_sets(reg, hub, tmp_path):  # noqa: F811
    files = [_save_lora(tmp_path, seed=s) for s in (41, 42)]
    imported = import_adapter(reg, files[0], name="origin-imported", trigger_words=["zkimp"],
                              description="Imported.")
    other = import_adapter(reg, files[1], name="origin-parent")
    hub.put_files("alice/origin", {"pytorch_lora_weights.safetensors": files[1].read_bytes()})
    pulled = studio_hub.pull_adapter(reg, "alice/origin", name="origin-pulled", token=TOKEN)
    merged = merge_adapters(reg, [(imported.ref, 0.5), (other.ref, 0.5)], method="linear", name="origin-merged",
                            description="Merged.")
    result = train(_config(tmp_path, "output.name=origin-trained", "training.max_train_steps=2"), console=False)
    trained = reg.get(result.ref)

    # Every origin counts the modules it patches of those the base has (the trained run's pipeline holds
    # peft's wrappers: each counts as the layer it wraps)
    import torch

    from studio.core.base_models import load_fresh_pipeline

    base = load_fresh_pipeline("tiny")
    layers = {c: {n for n, m in getattr(base, c).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
              for c in ("unet", "text_encoder")}
    for v in (imported, pulled, merged, trained):
        patched = formats.read_adapter(v.path).modules()
        by_component = {c: [sum(1 for pc, _ in patched if pc == c), len(names)] for c, names in layers.items()}
        assert all(name in layers[c] for c, name in patched), v.origin
        assert v.metrics["applies_to"] == {"modules": len(patched), "of": sum(map(len, layers.values())),
                                           "by_component": by_component}, v.origin
    assert formats.coverage_text(trained.metrics["applies_to"]).startswith(f"{len(patched)} modules of ")

    # The keys build_metadata writes for every adapter, plus what the canonical writer adds.
    ingest_keys = set(formats.build_metadata(adapter_type="lora", rank=1, alpha=1.0, family="sd1", name="x")) | {
        formats.ADAPTER_METADATA_KEY, "sshs_model_hash", "modelspec.hash_sha256"}
    versions = {"imported": imported, "pulled": pulled, "merged": merged, "trained": trained}
    for origin, v in versions.items():
        md = v.safetensors_metadata
        assert v.origin == origin and v.weights_format == "peft", origin
        assert ingest_keys <= set(md), (origin, sorted(ingest_keys - set(md)))
        assert md["ss_output_name"] == md["modelspec.title"] == v.name, origin
        assert (md["ss_network_dim"], md["ss_network_alpha"]) == (str(v.rank), str(float(v.alpha))), origin
        assert md.get("modelspec.trigger_phrase", "") == ", ".join(v.trigger_words), origin
        assert md.get("modelspec.description", "") == v.description, origin
        assert md["sshs_model_hash"] == tensor_sha256(v.path), origin
        config = json.loads(md[formats.ADAPTER_METADATA_KEY])
        assert {key.split(".", 1)[0] for key in config} == set(v.components), origin
        assert formats.detect(v.path).key_style == "peft", origin
    # The training run's adapter file is the registered file, byte for byte.
    assert tensor_sha256(result.adapter) == trained.tensor_sha256
    assert trained.safetensors_metadata == formats.detect(result.adapter).metadata


def _kohya_lora(path, seed: int, metadata: dict | None = None):
    """A kohya-layout LoRA on one attention projection of the tiny UNet (64 -> 64)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_down.weight": torch.randn(4, 64, generator=g),
               f"{key}.lora_up.weight": torch.randn(64, 4, generator=g), f"{key}.alpha": torch.tensor(4.0)},
              str(path), metadata=metadata or {})
    return path


def test_a_catalog_folder_imports_every_file_with_one_report(reg, tmp_path, capsys):
    from studio.app.cli import main

    catalog = tmp_path / "Lora"
    _kohya_lora(catalog / "neon.safetensors", 0)
    _kohya_lora(catalog / "styles" / "neon copy.safetensors", 0, {"ss_output_name": "neon copy"})  # same tensors
    _kohya_lora(catalog / "styles" / "Ink (v2).safetensors", 1)  # not a valid name as it is: cleaned
    _sdxl_file(catalog / "xl.safetensors")  # another family than the base
    (catalog / "old.ckpt").write_bytes(b"\x80\x04pickle")
    (catalog / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (catalog / "readme.txt").write_text("not an adapter")
    assert main(["adapters", "import", str(catalog), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["path"].split("/Lora/")[1]: row for row in report["files"]}
    assert set(rows) == {"neon.safetensors", "styles/neon copy.safetensors", "styles/Ink (v2).safetensors",
                         "xl.safetensors", "old.ckpt", "broken.safetensors"}
    assert (rows["neon.safetensors"]["status"], rows["neon.safetensors"]["ref"]) == ("imported", "neon@1")
    assert rows["styles/neon copy.safetensors"]["status"] == "duplicate"
    assert rows["styles/neon copy.safetensors"]["ref"] == "neon@1"
    assert (rows["styles/Ink (v2).safetensors"]["status"], rows["styles/Ink (v2).safetensors"]["ref"]) == (
        "imported", "Ink_v2@1")
    assert rows["xl.safetensors"]["status"] == "refused" and "SDXL" in rows["xl.safetensors"]["reason"]
    assert rows["old.ckpt"]["status"] == "refused" and "pickle" in rows["old.ckpt"]["reason"]
    assert rows["broken.safetensors"]["status"] == "refused" and rows["broken.safetensors"]["reason"]
    assert report["counts"] == {"imported": 2, "existing": 0, "duplicate": 1, "refused": 3}
    # Again: everything already there, nothing registered twice
    assert main(["adapters", "import", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "existing  neon.safetensors  neon@1" in out and "0 imported, 2 existing, 1 duplicate, 3 refused" in out
    assert reg.list_versions(limit=None).total == 2
