"""Merging registered LoRAs with peft's weighted merge: exactness, lineage, and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_compose import _save_lora, _save_method_adapter

from adapters.compose import AdapterSpec, engine_for
from adapters.ingest import import_adapter
from adapters.merge import merge_adapters, parse_merge_arg
from adapters.registry import VersionInfo
from studio.core.base_models import load_fresh_pipeline, load_pipeline
from studio.core.errors import IncompatibleAdapterError, InvalidRequestError, UnsupportedAdapterError
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    made = {"a": _save_lora(load_fresh_pipeline("tiny"), root, seed=21),
            "b": _save_lora(load_fresh_pipeline("tiny"), root, seed=22, text_encoder=False),
            "r8": _save_lora(load_fresh_pipeline("tiny"), root, seed=23, rank=8, alpha=4)}
    yield made
    engine_for(load_pipeline("tiny")).unload_all()  # leave the shared pipeline clean


@pytest.fixture
def parents(reg, files):
    return {key: import_adapter(reg, path, name=f"merge-{key}").ref for key, path in files.items()}


def _px(adapters) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=8, guidance_scale=2.0,
                                adapters=[a.to_dict() for a in adapters])
    return np.asarray(generate(request).images[0]).astype(int)


def test_parse_merge_arg():
    assert parse_merge_arg("style@2:0.7") == ("style@2", 0.7)
    assert parse_merge_arg("style") == ("style", 1.0)


def test_linear_merge_of_one_adapter_at_weight_one_reproduces_it(reg, parents):
    merged = merge_adapters(reg, [(parents["a"], 1.0)], method="linear", name="merged-one")
    assert merged.origin == "merged" and list(merged.components) == ["unet", "text_encoder"]
    original, copy = _px([AdapterSpec(parents["a"], 1.0)]), _px([AdapterSpec(merged.ref, 1.0)])
    assert np.abs(original - _px([])).max() > 20  # the adapter does something
    assert np.abs(original - copy).max() <= 1  # the same delta, refactored: float rounding only


def test_cat_merge_equals_the_stack_and_records_lineage(reg, parents):
    merged = merge_adapters(reg, [(parents["a"], 0.6), (parents["r8"], -0.4)], method="cat", name="merged-cat")
    assert merged.rank == 4 + 8  # cat puts the factors side by side
    stack = _px([AdapterSpec(parents["a"], 0.6), AdapterSpec(parents["r8"], -0.4)])
    assert np.abs(stack - _px([AdapterSpec(merged.ref, 1.0)])).max() <= 1
    assert [p.ref for p in merged.parents] == [parents["a"], parents["r8"]]
    assert merged.source["merge"] == {"method": "cat", "parents": [parents["a"], parents["r8"]],
                                      "weights": [0.6, -0.4], "density": None, "rank": None,
                                      "components": ["unet", "text_encoder"]}
    assert json.loads(merged.safetensors_metadata["lora_studio_merge"])["method"] == "cat"
    assert [c.ref for c in reg.children(parents["a"])] == [merged.ref]


@pytest.mark.parametrize("method, kwargs", [("linear", {}), ("svd", {"rank": 2}), ("ties", {"density": 0.5}),
                                            ("dare_linear", {"density": 0.7})])
def test_every_method_gives_an_adapter_that_loads_and_generates(reg, parents, method, kwargs):
    merged = merge_adapters(reg, [(parents["a"], 0.7), (parents["b"], 0.7)], method=method,
                            name=f"merged-{method.replace('_', '-')}", **kwargs)
    assert merged.rank == kwargs.get("rank", 4)
    assert merged.source["merge"]["method"] == method
    assert np.abs(_px([AdapterSpec(merged.ref, 1.0)]) - _px([])).max() > 5


def test_what_peft_cannot_merge_is_refused_with_a_reason(reg, parents, files, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"same rank \(merge-a@1: rank 4, merge-r8@1: rank 8\).*--method cat"):
        merge_adapters(reg, [(parents["a"], 1.0), (parents["r8"], 1.0)], method="linear", name="bad")
    with pytest.raises(InvalidRequestError, match="needs --density"):
        merge_adapters(reg, [(parents["a"], 1.0), (parents["b"], 1.0)], method="ties", name="bad")
    with pytest.raises(InvalidRequestError, match="--rank applies to svd"):
        merge_adapters(reg, [(parents["a"], 1.0), (parents["b"], 1.0)], method="linear", rank=2, name="bad")
    with pytest.raises(InvalidRequestError, match="unknown merge method"):
        merge_adapters(reg, [(parents["a"], 1.0)], method="average", name="bad")
    with pytest.raises(InvalidRequestError, match="named twice"):
        merge_adapters(reg, [(parents["a"], 1.0), (parents["a"], 0.5)], method="cat", name="bad")
    with pytest.raises(InvalidRequestError, match=r"\[-4, 4\]"):
        merge_adapters(reg, [(parents["a"], 9.0)], method="linear", name="bad")
    loha, _ = _save_method_adapter(tmp_path, "loha", seed=31)
    loha_ref = import_adapter(reg, loha, name="merge-loha").ref
    with pytest.raises(UnsupportedAdapterError, match="plain LoRA layers only"):
        merge_adapters(reg, [(parents["a"], 1.0), (loha_ref, 1.0)], method="cat", name="bad")
    xl = reg.register("merge-xl", files["b"], VersionInfo(family="sdxl", adapter_type="lora", rank=4))
    with pytest.raises(IncompatibleAdapterError, match="different families"):
        merge_adapters(reg, [(parents["a"], 1.0), (xl.ref, 1.0)], method="cat", name="bad")
    assert [a.name for a in reg.list_versions(search="bad", limit=None).items] == []


def test_cli_adapters_merge(parents, capsys):
    from studio.app.cli import main

    assert main(["adapters", "merge", f"{parents['a']}:0.5", f"{parents['b']}:0.5", "--method", "linear",
                 "--name", "cli-merged", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["ref"] == "cli-merged@1" and row["origin"] == "merged"
    assert main(["adapters", "merge", f"{parents['a']}:0.5", f"{parents['r8']}:0.5", "--method", "linear",
                 "--name", "cli-bad"]) == 2
    assert "same rank" in capsys.readouterr().err
