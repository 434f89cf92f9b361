"""Hub publish and pull against a local Hub (tests/hub_server.py): the real huggingface_hub client end to end.

Round trip (same tensors, trigger words, lineage, samples), the model card's fields, dry runs, tags that
never move, failure paths (401/403/404/500, a connection dropped mid-upload) that leave the registry as
it was, and a token that appears nowhere but the Authorization header.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import types
import zlib
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file

from adapters import formats
from adapters.ingest import import_adapter
from adapters.registry import Registry, SampleImage, VersionInfo
from studio.app import hub as studio_hub
from studio.core.errors import (
    HubAuthError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    OfflineError,
    UnsupportedAdapterError,
)
from studio.core.settings import reload_settings

TOKEN = "hf_AliceSecretToken0123456789abcdef"
BOB = "hf_BobSecretToken0123456789abcdefgh"
REPO = "alice/stripes"
PROMPT = "zkstripes, a red circle on a blue background"


def _save_lora(out_dir: Path, *, seed: int, rank: int = 4, alpha: int = 8) -> Path:
    """A random LoRA (UNet + text encoder) for the tiny model, saved as diffusers does, alpha metadata kept
    (text-encoder layers in peft key form, as transformers 5 needs; see tests/test_compose.py)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from studio.core.base_models import load_fresh_pipeline

    pipe = load_fresh_pipeline("tiny")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     init_lora_weights=False)
    tcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                      init_lora_weights=False)
    pipe.unet.add_adapter(cfg, adapter_name="new")
    pipe.text_encoder.add_adapter(tcfg, adapter_name="new")
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="new"))
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=unet_layers,
        unet_lora_adapter_metadata=cfg.to_dict(),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="new"),
        text_encoder_lora_adapter_metadata=tcfg.to_dict())
    named = out_dir / f"lora{seed}.safetensors"
    (out_dir / "pytorch_lora_weights.safetensors").rename(named)
    return named


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_loras")
    return [_save_lora(root, seed=s) for s in (11, 12)]


def _png(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


TRAINING = {"dataset": {"path": "/home/alice/private/stripes", "resolution": 32, "trigger_word": "zkstripes"},
            "training": {"learning_rate": 0.0001, "max_train_steps": 300, "seed": 7},
            "network": {"adapter_type": "lora", "rank": 4, "lora_alpha": 8}}


@pytest.fixture
def versions(reg, lora_files, tmp_path):
    """stripes@1 (imported) and stripes@2 (trained from @1: training config, metrics, a sample, dataset size)."""
    v1 = import_adapter(reg, lora_files[0], name="stripes", trigger_words=["zkstripes"], tags=["style"],
                        description="Diagonal stripes.")
    info = formats.detect(lora_files[1])
    adapter = formats.read_adapter(lora_files[1], info=info)
    md = formats.build_metadata(adapter_type="lora", rank=adapter.rank, alpha=adapter.alpha, family="sd1",
                                name="stripes",
                                trigger_words=["zkstripes"], base={"ss_num_train_images": "12", "ss_steps": "300",
                                                                   "ss_learning_rate": "0.0001"})
    trained = formats.to_diffusers(adapter, tmp_path / "trained.safetensors", metadata=md)
    v2 = reg.register("stripes", trained, VersionInfo(
        family="sd1", rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules,
        components=adapter.components, trigger_words=["zkstripes"], tags=["style", "stripes"],
        description="Diagonal stripes, trained longer.", license="cc-by-4.0", author="alice", base_model="tiny",
        training_config=TRAINING, dataset_fingerprint="0123abcd0123abcd", origin="trained",
        source={"run_dir": "/home/alice/runs/7"}, parents=["stripes@1"],
        metrics={"steps": 300, "final_loss": 0.125},
        samples=[SampleImage(image=_png(PROMPT), recipe={"prompt": PROMPT, "seed": 1, "steps": 20})],
        weights_format="peft"))
    return v1, v2


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local Hub, with huggingface_hub pointed at it and online for this test only."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _http

    server = FakeHub(tokens={TOKEN: "alice", BOB: "bob"}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import, when conftest had set it
    # hf_xet would upload to a Xet CAS service; the local Hub speaks the LFS protocol the client falls back to.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache" / "token"))
    # The client backs off 1, 2, 4, 8, 8 s between retries: keep the retries, skip the waiting.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: None))
    reload_settings()
    yield server
    server.stop()
    reload_settings()


def _tensors(path) -> dict:
    return load_file(str(path))


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _no_token_anywhere(*roots: Path, texts=()) -> None:
    for text in texts:
        assert TOKEN not in text and BOB not in text
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert TOKEN.encode() not in data and BOB.encode() not in data, p


@pytest.mark.usefixtures("registry_backend")  # on SQLite and on PostgreSQL
def test_publish_then_pull_round_trips_a_version(reg, versions, hub, tmp_path, studio_home):
    v1, v2 = versions
    dry = studio_hub.publish_version(reg, "stripes@2", REPO, kohya=True, dry_run_dir=tmp_path / "dry")
    result = studio_hub.publish_version(reg, "stripes@2", REPO, kohya=True, token=TOKEN)

    # One commit, tagged v2, holding exactly the dry run's files (weights byte for byte).
    assert result.tag == "v2" and not result.dry_run and not result.already_published
    repo = hub.repos[REPO]
    assert repo.tags == {"v2": result.commit} and repo.branches["main"] == result.commit
    assert len(repo.commits) == 2  # the repo's initial commit + the publication
    assert sorted(result.files) == sorted(dry.files) == sorted(p.relative_to(tmp_path / "dry").as_posix()
                                                               for p in (tmp_path / "dry").rglob("*") if p.is_file())
    assert hub.files(REPO, "v2") == sorted([".gitattributes", *result.files])
    assert set(result.files) == {"pytorch_lora_weights.safetensors", "stripes.safetensors", "images/sample_0.png",
                                 "lora_studio.json", "README.md"}
    assert hub.file(REPO, "v2", "pytorch_lora_weights.safetensors") == \
        (tmp_path / "dry" / "pytorch_lora_weights.safetensors").read_bytes()
    assert hub.file(REPO, "v2", "images/sample_0.png") == Path(v2.samples[0].path).read_bytes()
    assert result.url == f"{hub.url}/{REPO}" and result.commit_url.endswith(result.commit)

    # Uploaded weights: the registry's tensors, peft config and trigger words in the metadata; kohya copy too.
    (tmp_path / "got").mkdir()
    got = tmp_path / "got" / "w.safetensors"
    got.write_bytes(hub.file(REPO, "v2", "pytorch_lora_weights.safetensors"))
    ours, theirs = _tensors(v2.path), _tensors(got)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    md = _metadata(got)
    assert "lora_adapter_metadata" in md and md["modelspec.trigger_phrase"] == "zkstripes"
    kohya = tmp_path / "got" / "stripes.safetensors"
    kohya.write_bytes(hub.file(REPO, "v2", "stripes.safetensors"))
    assert formats.detect(kohya).format == "kohya"

    # The registry records the publication; a re-run uploads nothing and records nothing new.
    [pub] = reg.publications("stripes@2")
    assert (pub.repo_id, pub.tag, pub.commit, pub.url, pub.endpoint) == (REPO, "v2", result.commit, result.url,
                                                                        hub.url)
    again = studio_hub.publish_version(reg, "stripes@2", REPO, kohya=True, token=TOKEN)
    assert again.already_published and again.commit == result.commit and len(repo.commits) == 2
    assert len(reg.publications("stripes@2")) == 1 and reg.publications("stripes@1") == []

    # Pull into another registry (another machine): same tensors, trigger words, lineage, samples, settings.
    with Registry(home=tmp_path / "elsewhere") as other:
        pulled = studio_hub.pull_adapter(other, f"{REPO}@v2", token=TOKEN)
        assert pulled.ref == "stripes@1" and pulled.origin == "pulled"
        assert pulled.tensor_sha256 == v2.tensor_sha256
        back = _tensors(pulled.path)
        assert back.keys() == ours.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
        assert (pulled.rank, pulled.alpha, pulled.components) == (v2.rank, v2.alpha, v2.components)
        assert pulled.trigger_words == ("zkstripes",) and pulled.tags == ("style", "stripes")
        assert (pulled.description, pulled.license, pulled.author) == (v2.description, "cc-by-4.0", "alice")
        assert pulled.source["hub"] == {"repo_id": REPO, "revision": "v2", "commit": result.commit,
                                        "endpoint": hub.url, "url": f"{hub.url}/{REPO}",
                                        "file": "pytorch_lora_weights.safetensors"}
        assert pulled.source["lineage"] == [{"name": "stripes", "number": 1, "sha256": v1.weights_sha256}]
        assert pulled.source["published_from"] == "stripes@2"
        assert pulled.parents == ()  # stripes@1 is not in this registry: the lineage stays in source
        # the published metrics, plus the pull's own count against this studio's base (tiny: 119 + 12 layers)
        assert {k: v for k, v in pulled.metrics.items() if k != "applies_to"} == v2.metrics
        assert pulled.metrics["applies_to"]["of"] == 131 and pulled.dataset_fingerprint == v2.dataset_fingerprint
        # Local folders never go public: the dataset path is reduced to its last component.
        assert pulled.training_config["dataset"]["path"] == "stripes"
        assert pulled.training_config["training"] == TRAINING["training"]
        [sample] = pulled.samples
        assert sample.recipe == v2.samples[0].recipe and sample.sha256 == v2.samples[0].sha256

        # Pulling the same revision again is a no-op: no new version, no file downloaded.
        before = len(hub.requests)
        assert studio_hub.pull_adapter(other, f"{REPO}@v2", token=TOKEN).ref == pulled.ref
        assert other.adapter("stripes").versions == (1,)
        assert not [r for r in hub.requests[before:] if "/resolve/" in r.path and "lora_studio" not in r.path]
        _no_token_anywhere(tmp_path / "elsewhere")

    # Pulled back beside its parents, the lineage links to them.
    copy = studio_hub.pull_adapter(reg, REPO, revision="v2", name="stripes_copy", token=TOKEN)
    assert [p.ref for p in copy.parents] == ["stripes@1"] and copy.tensor_sha256 == v2.tensor_sha256

    _no_token_anywhere(studio_home, tmp_path / "dry", texts=[json.dumps(result.to_dict()), repr(result)])
    for r in hub.requests:
        assert TOKEN.encode() not in r.body and TOKEN not in json.dumps(r.headers)


def test_model_card_parses_and_carries_every_field(reg, versions, hub, tmp_path):
    from huggingface_hub import ModelCard

    result = studio_hub.publish_version(reg, "stripes@2", REPO, kohya=True, token=TOKEN,
                                        base_model="alice/tiny-sd1")
    card_path = tmp_path / "README.md"
    card_path.write_bytes(hub.file(REPO, "v2", "README.md"))
    card = ModelCard.load(card_path)
    data = card.data.to_dict()
    assert data["base_model"] == "alice/tiny-sd1"
    assert data["library_name"] == "diffusers" and data["license"] == "cc-by-4.0"
    assert data["instance_prompt"] == "zkstripes"
    for tag in ("text-to-image", "diffusers", "lora", "template:sd-lora", "stable-diffusion", "style", "stripes"):
        assert tag in data["tags"]
    assert data["widget"] == [{"text": PROMPT, "output": {"url": "images/sample_0.png"}}]
    assert "images/sample_0.png" in result.files
    body = card.text
    for text in ("<Gallery />", "## Trigger words", "`zkstripes`", "load_lora_weights('alice/stripes'",
                 "revision='v2'", "Dataset size: 12 images", "`training.learning_rate` | 0.0001",
                 "Parent: `stripes@1`", "stripes.safetensors", "<lora:stripes:0.8>"):
        assert text in body, text
    assert "/home/alice" not in card.content  # local paths never go public
    assert result.warnings == ()
    # The Hub's metadata check ran on it (create_commit validates README.md before uploading anything).
    assert any(r.path == "/api/validate-yaml" for r in hub.requests)


def test_tiny_base_publishes_without_base_model_and_says_so(reg, versions, tmp_path):
    result = studio_hub.publish_version(reg, "stripes@1", REPO, dry_run_dir=tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "base_model" not in text.split("\n---\n")[0]
    assert result.warnings and "base_model" in result.warnings[0]
    assert "load_fresh_pipeline(\"tiny\")" in text and "license: unknown" in text


def test_dry_run_needs_no_network_or_token_and_refuses_a_folder_with_files(reg, versions, tmp_path):
    # conftest keeps the studio offline and there is no token: a dry run still writes every file.
    result = studio_hub.publish_version(reg, "stripes@2", REPO, dry_run_dir=tmp_path / "out")
    assert result.dry_run and result.commit is None and result.out_dir == tmp_path / "out"
    assert sorted(result.files) == sorted(p.relative_to(tmp_path / "out").as_posix()
                                          for p in (tmp_path / "out").rglob("*") if p.is_file())
    record = json.loads((tmp_path / "out" / "lora_studio.json").read_text())
    assert record["ref"] == "stripes@2" and record["parents"][0]["name"] == "stripes"
    with pytest.raises(Exception, match="not an empty folder"):
        studio_hub.publish_version(reg, "stripes@2", REPO, dry_run_dir=tmp_path / "out")
    assert reg.publications("stripes@2") == []


def test_offline_and_missing_token_fail_fast(reg, versions, hub, monkeypatch):
    import huggingface_hub.constants as constants

    with pytest.raises(HubAuthError, match="hf auth login"):
        studio_hub.publish_version(reg, "stripes@2", REPO)
    assert hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reload_settings()
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    with pytest.raises(OfflineError):
        studio_hub.pull_adapter(reg, REPO, token=TOKEN)
    assert hub.requests == [] and reg.publications("stripes@2") == []


def test_token_from_the_environment_is_used_and_never_stored(reg, versions, hub, monkeypatch, studio_home):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = studio_hub.publish_version(reg, "stripes@1", REPO, private=True)
    assert result.private is True and hub.repos[REPO].private
    _no_token_anywhere(studio_home)


def _assert_nothing_recorded(reg, hub, error):
    assert reg.publications("stripes@2") == []
    repo = hub.repos.get(REPO)
    assert repo is None or repo.tags == {}
    assert TOKEN not in str(error) and BOB not in str(error)


@pytest.mark.parametrize("method, path, status, error, words", [
    ("POST", r"^/api/repos/create$", 500, HubError, "failed (500)"),
    ("POST", r"/preupload/", 401, HubAuthError, "401"),
    ("POST", r"/commit/main$", 500, HubError, "failed (500)"),
    ("POST", r"/commit/main$", 403, HubAuthError, "403"),
    ("POST", r"/tag/", 500, HubError, "failed (500)"),
])
def test_refusals_leave_the_registry_unchanged(reg, versions, hub, method, path, status, error, words):
    hub.fail(method, path, status, times=100, message="server trouble")
    with pytest.raises(error, match=re.escape(words)) as caught:
        studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    assert caught.value.status == status
    _assert_nothing_recorded(reg, hub, caught.value)
    # Once the Hub recovers, the same command completes (a commit made before a failed tag is tagged now).
    hub.faults.clear()
    result = studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    assert hub.repos[REPO].tags == {"v2": result.commit} and len(reg.publications("stripes@2")) == 1


def test_wrong_or_foreign_tokens(reg, versions, hub):
    with pytest.raises(HubAuthError, match=r"401") as caught:
        studio_hub.publish_version(reg, "stripes@2", REPO, token="hf_not_a_real_token_at_all")
    assert "hf_not_a_real_token_at_all" not in str(caught.value)
    with pytest.raises(HubAuthError, match=r"403.*write access to alice") as caught:
        studio_hub.publish_version(reg, "stripes@2", REPO, token=BOB)
    _assert_nothing_recorded(reg, hub, caught.value)


def test_connection_dropped_mid_upload(reg, versions, hub):
    hub.drop("PUT", r"^/lfs-upload/", times=100, after_bytes=512)
    with pytest.raises(HubError, match="dropped") as caught:
        studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    _assert_nothing_recorded(reg, hub, caught.value)
    assert hub.files(REPO, "main") == [".gitattributes"]  # the commit never happened
    # One drop only: the client's retry sends the file again and the publication completes.
    hub.faults.clear()
    hub.drop("PUT", r"^/lfs-upload/", times=1, after_bytes=512)
    result = studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    assert hub.file(REPO, "v2", "pytorch_lora_weights.safetensors")
    assert reg.publications("stripes@2")[0].commit == result.commit


@pytest.mark.usefixtures("registry_backend")  # on SQLite and on PostgreSQL
def test_pull_failures(reg, versions, hub):
    with pytest.raises(HubNotFoundError, match="not found"):
        studio_hub.pull_adapter(reg, "alice/nothing-here", token=TOKEN)
    studio_hub.publish_version(reg, "stripes@1", REPO, private=True, token=TOKEN)
    with pytest.raises(HubNotFoundError, match="no revision 'v9'"):
        studio_hub.pull_adapter(reg, f"{REPO}@v9", token=TOKEN)
    with pytest.raises(HubAuthError, match="401.*private"):  # private, no token: the Hub answers 401
        studio_hub.pull_adapter(reg, REPO)
    hub.fail("GET", r"/resolve/", 500, times=100)
    with pytest.raises(HubError, match="500"):
        studio_hub.pull_adapter(reg, REPO, name="other", token=TOKEN)
    assert reg.adapter("stripes").versions == (1, 2)
    with pytest.raises(InvalidNameError):
        studio_hub.pull_adapter(reg, "not a repo")


def test_tags_never_move_and_a_new_version_replaces_the_previous_files(reg, versions, hub):
    first = studio_hub.publish_version(reg, "stripes@1", REPO, kohya=True, token=TOKEN)
    second = studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    assert "stripes.safetensors" in hub.files(REPO, "v1")
    assert "stripes.safetensors" not in hub.files(REPO, "v2")  # v2 has no kohya copy: v1's is not carried on
    assert hub.repos[REPO].tags == {"v1": first.commit, "v2": second.commit}
    # Another registry's x@1 holds other tensors than the stripes@1 that tag v1 holds: the tag never moves.
    with Registry(home=Path(reg.store.root).parent / "b") as other:
        x = other.register("x", versions[1].path, VersionInfo(family="sd1"))
        assert x.number == 1
        with pytest.raises(HubConflictError, match="never moved") as caught:
            studio_hub.publish_version(other, "x@1", REPO, token=TOKEN)
        assert "stripes@1" in str(caught.value) and other.publications("x@1") == []
    assert hub.repos[REPO].tags == {"v1": first.commit, "v2": second.commit}


def test_kohya_copy_is_refused_for_dora_before_anything_is_sent(reg, versions, hub, monkeypatch):
    from adapters import registry as registry_module

    real_get = reg.get

    def as_dora(ref):  # a FLUX.1 DoRA: its kohya layout fuses q/k/v, whose dora_scale cannot be written
        v = real_get(ref)
        return registry_module.AdapterVersion(**{**v.__dict__, "adapter_type": "dora", "family": "flux"})

    monkeypatch.setattr(reg, "get", as_dora)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        studio_hub.publish_version(reg, "stripes@2", REPO, kohya=True, token=TOKEN)
    assert hub.requests == []


def test_weights_load_in_diffusers_from_the_repo(reg, versions, hub, monkeypatch):
    """``load_lora_weights(repo_id, revision=tag)`` reads the published weights and gives the registry file's output."""
    import huggingface_hub.constants as constants
    import numpy as np

    from studio.core.base_models import load_fresh_pipeline
    from studio.generation.requests import GenerationRequest
    from studio.generation.run import generate_with_pipeline

    studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    # diffusers calls hf_hub_download without an endpoint: point the library's defaults at the local Hub.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    request = GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, guidance_scale=2.0)
    from_hub = load_fresh_pipeline("tiny")
    from_hub.load_lora_weights(REPO, weight_name="pytorch_lora_weights.safetensors", revision="v2",
                               adapter_name="from_hub", cache_dir=str(Path(reg.store.root).parent / "hf-cache"))
    # The registry's own file, under a .safetensors name (blobs are named by hash alone).
    local = Path(reg.store.root).parent / "local" / "stripes.safetensors"
    local.parent.mkdir()
    shutil.copyfile(versions[1].path, local)
    from_file = load_fresh_pipeline("tiny")
    from_file.load_lora_weights(str(local.parent), weight_name=local.name, adapter_name="from_file")
    a = np.asarray(generate_with_pipeline(from_hub, request).images[0]).astype(int)
    b = np.asarray(generate_with_pipeline(from_file, request).images[0]).astype(int)
    base = np.asarray(generate_with_pipeline(load_fresh_pipeline("tiny"), request).images[0]).astype(int)
    assert np.array_equal(a, b) and np.abs(a - base).max() > 5
    assert any(r.method == "GET" and r.path == f"/{REPO}/resolve/v2/pytorch_lora_weights.safetensors"
               for r in hub.requests)


def test_repo_ids_are_validated():
    assert studio_hub.parse_repo_reference("alice/stripes@v3") == ("alice/stripes", "v3")
    assert studio_hub.parse_repo_reference("alice/stripes") == ("alice/stripes", None)
    for bad in ("stripes", "alice/stripes/x", "alice/../x", "alice/x--y", "-a/b", "a/b.", "alice/stripes@"):
        with pytest.raises(InvalidNameError):
            studio_hub.parse_repo_reference(bad)


def test_public_value_drops_local_folders():
    config = {"dataset": {"path": "/home/a/cats", "cache_dir": "C:\\Users\\a\\cache", "resolution": 512},
              "model": {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "list": ["~/x/y"]}
    assert studio_hub.public_value(config) == {
        "dataset": {"path": "cats", "cache_dir": "cache", "resolution": 512},
        "model": {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "list": ["y"]}


def test_cli_publish_show_pull(reg, versions, hub, monkeypatch, capsys, tmp_path):
    from studio.app.cli import main

    assert main(["adapters", "publish", "stripes@2", "--repo", REPO, "--kohya", "--dry-run", str(tmp_path / "dry"),
                 "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and (tmp_path / "dry" / "README.md").is_file() and hub.requests == []

    # No token: one line on stderr, exit status 2, nothing sent.
    assert main(["adapters", "publish", "stripes@2", "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hf auth login" in err and err.count("\n") == 1 and hub.requests == []

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["adapters", "publish", "stripes@2", "--repo", REPO, "--kohya"]) == 0
    out = capsys.readouterr()
    assert f"published stripes@2 -> {REPO}@v2" in out.out and out.out.strip().endswith(f"{REPO}/tree/v2")
    assert main(["adapters", "show", "stripes@2"]) == 0
    shown = capsys.readouterr().out
    assert f"published:          {REPO}@v2 (commit {hub.repos[REPO].tags['v2'][:12]}" in shown
    assert main(["adapters", "show", "stripes@2", "--json"]) == 0
    [pub] = json.loads(capsys.readouterr().out)["publications"]
    assert pub["tag"] == "v2" and pub["files"] == dry["files"]

    assert main(["adapters", "pull", f"{REPO}@v2", "--name", "stripes_pulled", "--json"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["ref"] == "stripes_pulled@1" and pulled["origin"] == "pulled"
    assert pulled["tensor_sha256"] == versions[1].tensor_sha256
    assert main(["adapters", "pull", f"{REPO}@v2", "--name", "stripes_pulled"]) == 0
    assert capsys.readouterr().out.startswith("already registered as stripes_pulled@1")

    hub.fail("POST", r"/commit/main$", 500, times=10)
    assert main(["adapters", "publish", "stripes@1", "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert "failed (500)" in err and TOKEN not in err and err.count("\n") == 1
    assert reg.publications("stripes@1") == []


def test_a_version_1_registry_gains_the_publications_table(versions, studio_home):
    """A database written before publications existed opens, migrates in place and keeps every record."""
    import sqlalchemy as sa

    from adapters.registry import SCHEMA_VERSION, registry_info

    engine = sa.create_engine(f"sqlite:///{studio_home / 'registry.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE version_publications")
        conn.exec_driver_sql("DROP TABLE audit_events")  # and what version 3 added
        conn.exec_driver_sql("ALTER TABLE aliases DROP COLUMN protected")
        conn.execute(sa.update(registry_info).values(value="1"))
    engine.dispose()
    with Registry() as reg:
        assert sa.inspect(reg._engine).has_table("version_publications")
        assert sa.inspect(reg._engine).has_table("audit_events")
        with reg._engine.connect() as conn:
            assert conn.execute(sa.select(registry_info.c.value)).scalar() == str(SCHEMA_VERSION) == "3"
        assert reg.adapter("stripes").versions == (1, 2) and reg.get("stripes@2").parents[0].ref == "stripes@1"
        pub = reg.record_publication("stripes@2", repo_id=REPO, tag="v2", commit="a" * 40, url="https://h/x",
                                     files=["README.md"])
        assert reg.record_publication("stripes@2", repo_id=REPO, tag="v2", commit="a" * 40, url="https://h/x") == pub
        assert reg.publications("stripes@2") == [pub]
        # Deleting a published version removes its publication rows with it (foreign keys are enforced).
        reg.delete("stripes@2")
        with reg._engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM version_publications")).scalar() == 0


# --------------------------------------------------------------------------------------------
# publication hygiene: no local path in any published byte
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
MARKER = "qzx9localonly"  # in the parent folders of the dataset, the base model and the run; nowhere else
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_texts(data: bytes) -> list[bytes]:
    """Every text a PNG carries, decoded: tEXt as is, zTXt and iTXt decompressed, plus the pixel stream."""
    out, pos, idat = [], len(PNG_MAGIC), b""
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            out.append(body)
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out += [key, zlib.decompress(rest[1:])]
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            lang, _, rest = rest.partition(b"\0")
            translated, _, text = rest.partition(b"\0")
            out += [key, lang, translated, zlib.decompress(text) if compressed else text]
        elif kind == b"IDAT":
            idat += body
        else:
            out.append(body)
    if idat:
        out.append(zlib.decompress(idat))
    return out


def _readable_forms(data: bytes) -> list[bytes]:
    """The bytes of a published file and what a reader decodes from them (PNG text chunks, the safetensors
    header and the JSON strings inside its metadata)."""
    forms = [data]
    if data.startswith(PNG_MAGIC):
        forms += _png_texts(data)
    elif len(data) > 8 and data[8:9] == b"{":
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        for value in (header.get("__metadata__") or {}).values():
            forms.append(value.encode())
            with contextlib.suppress(ValueError):
                forms.append(json.dumps(json.loads(value), ensure_ascii=False).encode())
    return forms


def _assert_nothing_local(files: dict[str, bytes], *needles: str) -> None:
    assert files
    for name, data in files.items():
        for form in _readable_forms(data):
            for needle in needles:
                assert needle.encode() not in form, f"{needle!r} is published in {name}"


@pytest.fixture
def marked_version(reg, tmp_path):
    """outlined@1, trained for 2 steps from a dataset, a single-file base model and an output folder that all
    lie below a folder named with MARKER (the sample PNG and the metadata hold those paths as the trainer wrote
    them)."""
    from studio.core.base_models import export_single_file
    from trainer.config import TrainConfig
    from trainer.loop import train

    private = tmp_path / f"{MARKER}-private"
    dataset = shutil.copytree(ROOT / "datasets" / "outlined_txt", private / "datasets" / "outlined")
    base = export_single_file("tiny", private / "models" / "tiny-sd1.safetensors")
    cfg = TrainConfig.from_toml(dataset / "train.toml").apply_overrides([
        f"model.base_model={base}", f"dataset.path={dataset}", f"output.dir={private / 'runs'}",
        "output.name=outlined", "training.max_train_steps=2", "training.lr_warmup_steps=0",
        "validation.every_n_steps=2", "validation.seeds=[0]", "output.checkpointing_steps=0",
        'validation.prompts=["a red circle on a blue background, zkoutline"]'])
    result = train(cfg, console=False)
    assert result.status == "done", result.message
    version = reg.get(result.ref)
    # The registry keeps the local truth: the test is only meaningful if the marker is there to leak.
    assert MARKER in json.dumps(version.safetensors_metadata) and MARKER in version.base_model
    assert version.samples and any(MARKER.encode() in t for t in _png_texts(Path(version.samples[0].path)
                                                                             .read_bytes()))
    return version


def test_no_published_byte_names_a_local_folder(reg, marked_version, hub, tmp_path, capsys):
    from studio.app.cli import main

    version = marked_version
    needles = (MARKER, str(tmp_path))
    capsys.readouterr()
    assert main(["adapters", "publish", version.ref, "--repo", REPO, "--kohya", "--dry-run", str(tmp_path / "dry"),
                 "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    written = {p: (tmp_path / "dry" / p).read_bytes() for p in dry["files"]}
    assert {"pytorch_lora_weights.safetensors", "outlined.safetensors", "images/sample_0.png", "lora_studio.json",
            "README.md"} <= set(written)
    _assert_nothing_local(written, *needles)

    result = studio_hub.publish_version(reg, version.ref, REPO, kohya=True, token=TOKEN)
    uploaded = {p: hub.file(REPO, result.tag, p) for p in result.files}
    assert uploaded == written  # the same cleaning on both paths, byte for byte
    _assert_nothing_local(uploaded, *needles)
    for r in hub.requests:  # commit messages and descriptions too
        assert MARKER.encode() not in r.body and str(tmp_path).encode() not in r.body

    # Cleaned, not emptied: the last component of each path stays, the recipes and settings stay usable.
    record = json.loads(written["lora_studio.json"])
    assert record["base_model"] == "tiny-sd1.safetensors"
    assert record["training_config"]["dataset"]["path"] == "outlined"
    [sample] = record["samples"]
    assert sample["recipe"]["base_model"] == "tiny-sd1.safetensors" and sample["recipe"]["seed"] == 0
    with Image.open(io.BytesIO(written["images/sample_0.png"])) as im:
        assert im.size == (32, 32)
        chunk = json.loads(im.text["lora_studio"])
        assert chunk["request"]["base_model"] == "tiny-sd1.safetensors"
        assert 'Model: "tiny-sd1.safetensors"' in im.text["parameters"] or \
            "Model: tiny-sd1.safetensors" in im.text["parameters"]
    md = json.loads(written["pytorch_lora_weights.safetensors"][8:8 + int.from_bytes(
        written["pytorch_lora_weights.safetensors"][:8], "little")])["__metadata__"]
    assert md["ss_sd_model_name"] == "tiny-sd1.safetensors" and "lora_adapter_metadata" in md
    assert json.loads(md["lora_studio.training"])["config"]["dataset"]["path"] == "outlined"
    assert "tiny-sd1.safetensors" in md["ss_training_comment"]
    (tmp_path / "check").mkdir()
    (tmp_path / "check" / "w.safetensors").write_bytes(written["pytorch_lora_weights.safetensors"])
    ours, theirs = _tensors(version.path), _tensors(tmp_path / "check" / "w.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_public_value_cleans_structures_json_strings_and_free_text():
    clean = studio_hub.public_value
    assert clean({"ss_sd_model_name": "/srv/models/base.safetensors", "base_model": "owner/model",
                  "init_image": "../in/put.png", "file": "images/sample_0.png", "dataset": {"path": "data/cats"},
                  "n": 3}) == \
        {"ss_sd_model_name": "base.safetensors", "base_model": "owner/model", "init_image": "put.png",
         "file": "images/sample_0.png", "dataset": {"path": "cats"}, "n": 3}
    assert clean(json.dumps({"run_dir": "/home/a/runs/7", "lr": 0.1}), "lora_studio.training") == \
        json.dumps({"run_dir": "7", "lr": 0.1})
    assert clean('{"lr": 0.1}', "lora_adapter_metadata") == '{"lr": 0.1}'  # unchanged JSON keeps its bytes
    assert clean("trained with LoRA Studio on /home/a/my models/base.safetensors",
                 known=("/home/a/my models/base.safetensors",)) == "trained with LoRA Studio on base.safetensors"
    assert clean('Steps: 4, Model: "C:\\\\Users\\\\a\\\\base.safetensors", see https://huggingface.co/a/b') == \
        'Steps: 4, Model: "base.safetensors", see https://huggingface.co/a/b'
    assert clean({"/home/a/data/10_cats": {"cat": 2}}) == {"10_cats": {"cat": 2}}
    assert clean("saved to file:///home/a/out/x.png, 1/2 done") == "saved to x.png, 1/2 done"
    assert clean({"path": "file:///home/a/cats"}) == {"path": "cats"}
    thumbnail = "data:image/jpeg;base64,/9j/4AAQSkZJRg=="
    assert clean({"modelspec.thumbnail": thumbnail}) == {"modelspec.thumbnail": thumbnail}


# --------------------------------------------------------------------------------------------
# publishing next to files the studio did not publish
# --------------------------------------------------------------------------------------------


def test_publish_deletes_only_files_a_previous_publication_listed(reg, versions, hub):
    foreign = {"other.safetensors": b"someone else's weights", "images/sample_5.png": _png("theirs"),
               "notes.txt": b"kept"}
    hub.put_files(REPO, foreign)
    studio_hub.publish_version(reg, "stripes@2", REPO, kohya=True, token=TOKEN)
    assert {"stripes.safetensors", "images/sample_0.png", *foreign} <= set(hub.files(REPO, "v2"))
    # stripes@1 has no kohya copy and no sample: the studio's own v2 files go, the foreign ones stay.
    studio_hub.publish_version(reg, "stripes@1", REPO, token=TOKEN)
    files = set(hub.files(REPO, "v1"))
    assert "stripes.safetensors" not in files and "images/sample_0.png" not in files
    assert set(foreign) <= files and all(hub.file(REPO, "v1", p) == data for p, data in foreign.items())


def test_publish_into_a_repo_without_a_studio_record_deletes_nothing(reg, versions, hub):
    hub.put_files(REPO, {"stripes.safetensors": b"not ours", "images/sample_3.png": _png("theirs")})
    studio_hub.publish_version(reg, "stripes@1", REPO, token=TOKEN)
    assert {"stripes.safetensors", "images/sample_3.png"} <= set(hub.files(REPO, "v1"))


# --------------------------------------------------------------------------------------------
# pull hygiene: sizes before downloads, bounded samples, the user's base model
# --------------------------------------------------------------------------------------------


def _bomb_png(side: int = 100_000) -> bytes:
    """A valid little PNG whose header claims ``side`` x ``side`` RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _downloads(hub) -> list[str]:
    return [r.path for r in hub.requests if "/resolve/" in r.path]


@pytest.mark.usefixtures("registry_backend")  # on SQLite and on PostgreSQL
def test_pull_checks_sizes_from_the_file_list_before_downloading(reg, versions, hub, monkeypatch):
    studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    hub.put_files(REPO, {"lora_studio.json": b" " * (studio_hub.MAX_RECORD_BYTES + 1)})
    before = len(hub.requests)
    with pytest.raises(InvalidRequestError, match=r"lora_studio\.json .*larger than"):
        studio_hub.pull_adapter(reg, REPO, name="big_record", token=TOKEN)
    assert not _downloads(types.SimpleNamespace(requests=hub.requests[before:]))

    hub.put_files(REPO, {"lora_studio.json": hub.file(REPO, "v2", "lora_studio.json")})
    monkeypatch.setattr(studio_hub, "MAX_WEIGHTS_BYTES", 1000)
    before = len(hub.requests)
    with pytest.raises(InvalidRequestError, match=r"pytorch_lora_weights\.safetensors .*larger than"):
        studio_hub.pull_adapter(reg, REPO, name="big_weights", token=TOKEN)
    assert [p for p in _downloads(types.SimpleNamespace(requests=hub.requests[before:]))
            if "safetensors" in p] == []
    assert reg.list_versions(name="big_weights").total == 0

    # A listing without sizes cannot bound a download: nothing is fetched.
    hub.report_sizes = False
    before = len(hub.requests)
    with pytest.raises(HubError, match="without its size"):
        studio_hub.pull_adapter(reg, REPO, name="no_sizes", token=TOKEN)
    assert not _downloads(types.SimpleNamespace(requests=hub.requests[before:]))


@pytest.mark.usefixtures("registry_backend")  # on SQLite and on PostgreSQL
def test_pull_refuses_a_decompression_bomb_sample_and_keeps_the_rest(reg, versions, hub, studio_home, capsys,
                                                                   monkeypatch):
    from studio.app.cli import main

    studio_hub.publish_version(reg, "stripes@2", REPO, token=TOKEN)
    bomb = _bomb_png()
    assert len(bomb) < 200
    hub.put_files(REPO, {"images/sample_0.png": bomb})
    capsys.readouterr()
    assert main(["adapters", "pull", REPO, "--name", "bombed"]) == 0
    out = capsys.readouterr()
    assert "pulled bombed@1" in out.out
    [warning] = [line for line in out.err.splitlines() if line.startswith("warning: ")]
    assert "sample images/sample_0.png was not stored" in warning and "100000x100000" in warning
    pulled = reg.get("bombed@1")
    assert pulled.samples == () and pulled.tensor_sha256 == versions[1].tensor_sha256
    [refused] = pulled.source["refused_samples"]
    assert refused["file"] == "images/sample_0.png" and "100000x100000" in refused["reason"]
    assert not any(bomb == p.read_bytes() for p in Path(reg.store.root).rglob("*") if p.is_file())

    # A sample over the size limit is refused from the file list, never downloaded.
    monkeypatch.setattr(studio_hub, "MAX_SAMPLE_BYTES", 100)
    hub.put_files(REPO, {"images/sample_0.png": _png(PROMPT)})
    before = len(hub.requests)
    pulled = studio_hub.pull_adapter(reg, REPO, name="big_sample", token=TOKEN)
    assert pulled.samples == () and "larger than" in pulled.source["refused_samples"][0]["reason"]
    assert not [p for p in _downloads(types.SimpleNamespace(requests=hub.requests[before:])) if "images/" in p]


@pytest.mark.parametrize("image, words", [(_bomb_png(), "100000x100000"), (b"not an image at all", "not a PNG"),
                                          (_bomb_png(5000), "5000x5000")])
def test_registry_refuses_a_sample_that_is_not_a_bounded_image(reg, lora_files, image, words):
    info = VersionInfo(family="sd1", samples=[SampleImage(image=image, recipe={"prompt": "x"})])
    with pytest.raises(InvalidRequestError, match=words):
        reg.register("bomb", lora_files[0], info)
    assert reg.list_versions().total == 0
    assert [p for p in Path(reg.store.root).rglob("*") if p.is_file()] == []


def test_adapters_page_lists_adapters_whose_stored_sample_is_bad(reg, versions):
    """A bad sample stored before samples were checked costs its card the thumbnail, never the listing."""
    import os

    from streamlit.testing.v1 import AppTest

    sample = Path(versions[1].samples[0].path)
    os.chmod(sample, 0o644)
    sample.write_bytes(_bomb_png())
    at = AppTest.from_file(str(ROOT / "studio" / "app" / "ui" / "adapters_page.py"), default_timeout=120).run()
    assert not at.exception and not at.error
    assert "**stripes**" in "\n".join(m.value for m in at.markdown)
    assert any("sample" in c.value and "100000x100000" in c.value for c in at.caption)


@pytest.mark.usefixtures("registry_backend")  # on SQLite and on PostgreSQL
def test_pull_validates_against_the_users_base_never_the_records(reg, lora_files, hub, monkeypatch, tmp_path):
    # Published from a local single-file base: the record names only the file, which no other machine has.
    info = formats.detect(lora_files[0])
    adapter = formats.read_adapter(lora_files[0], info=info)
    reg.register("local_base", lora_files[0], VersionInfo(
        family="sd1", rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules,
        components=adapter.components, base_model=str(tmp_path / "models" / "my-sd1.safetensors"),
        weights_format="peft"))
    studio_hub.publish_version(reg, "local_base@1", REPO, token=TOKEN)
    assert json.loads(hub.file(REPO, "v1", "lora_studio.json"))["base_model"] == "my-sd1.safetensors"
    with Registry(home=tmp_path / "elsewhere") as other:
        pulled = studio_hub.pull_adapter(other, REPO, token=TOKEN)
        assert pulled.base_model == "tiny" and pulled.source["published_base_model"] == "my-sd1.safetensors"

        # A record (and card) naming a Hub model or a local path is never fetched or opened: the user's --base is.
        record = json.loads(hub.file(REPO, "v1", "lora_studio.json"))
        for named in ("evil/forty-gigabytes", str(tmp_path / "nothing" / "here")):
            hub.put_files(REPO, {"lora_studio.json": json.dumps({**record, "base_model": named}).encode()})
            before = len(hub.requests)
            got = studio_hub.pull_adapter(other, REPO, name="again", token=TOKEN)
            assert got.base_model == "tiny" and got.source["published_base_model"] == named
            assert not [r for r in hub.requests[before:] if "forty-gigabytes" in r.path]
            other.delete("again")
        monkeypatch.setenv("LORA_STUDIO_BASE_MODEL", "/no/such/base")
        reload_settings()
        got = studio_hub.pull_adapter(other, REPO, name="explicit", base="tiny", token=TOKEN)
        assert got.base_model == "tiny"


def test_publication_cleans_free_text_and_leaves_out_a_bad_stored_sample(reg, versions, lora_files, tmp_path):
    """Paths with spaces inside free text (a comment, the description) go; a stored sample that no longer
    decodes within bounds is left out with a warning instead of being published."""
    local = f"/home/alice/{MARKER} work/base model.safetensors"
    info = formats.detect(lora_files[0])
    adapter = formats.read_adapter(lora_files[0], info=info)
    md = formats.build_metadata(adapter_type="lora", rank=adapter.rank, alpha=adapter.alpha, family="sd1",
                                name="spaced",
                                base={"ss_sd_model_name": local, "ss_training_comment": f"trained on {local} today"})
    weights = formats.to_diffusers(adapter, tmp_path / "spaced.safetensors", metadata=md)
    reg.register("spaced", weights, VersionInfo(
        family="sd1", rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules,
        components=adapter.components, base_model=local, description=f"Made from {local} by hand.",
        samples=[SampleImage(image=_png(f"a cat\nSteps: 4, Model: {local}"), recipe={"base_model": local})],
        weights_format="peft"))
    sample = Path(versions[1].samples[0].path)
    sample.chmod(0o644)
    sample.write_bytes(_bomb_png())

    result = studio_hub.publish_version(reg, "spaced@1", REPO, kohya=True, dry_run_dir=tmp_path / "spaced")
    written = {p: (tmp_path / "spaced" / p).read_bytes() for p in result.files}
    _assert_nothing_local(written, MARKER, "/home/alice")
    assert b"Made from base model.safetensors by hand." in written["README.md"]
    md = _metadata(tmp_path / "spaced" / "pytorch_lora_weights.safetensors")
    assert md["ss_training_comment"] == "trained on base model.safetensors today"

    result = studio_hub.publish_version(reg, "stripes@2", REPO, dry_run_dir=tmp_path / "bad")
    assert not [p for p in result.files if p.startswith("images/")]
    assert any("100000x100000" in w and "left out" in w for w in result.warnings)
    assert json.loads((tmp_path / "bad" / "lora_studio.json").read_text())["samples"] == []


def test_adapters_page_publishes_and_shows_the_publications_warnings(reg, versions, hub, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    page = str(Path(__file__).resolve().parent.parent / "studio" / "app" / "ui" / "adapters_page.py")
    at = AppTest.from_file(page, default_timeout=120).run()
    next(b for b in at.button if b.label == "Open").click().run()
    at.text_input(key="ad_repo").input(REPO)
    at.button(key="ad_publish").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(REPO in s.value for s in at.success)
    # The tiny base is no Hub repo: the card carries no base_model, and the page says so.
    assert any("base_model" in w.value for w in at.warning), [w.value for w in at.warning]
