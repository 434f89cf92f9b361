"""Fuzzing the two places where bytes from strangers enter the studio: recipe PNGs and safetensors headers.

Every generated input must end in a :class:`~studio.core.errors.StudioError` (one clear line for the user)
or in success, never in another exception. Two sources of inputs for each:

- recipes: arbitrary JSON values, arbitrary text, and valid recipes with one field (or an adapter
  entry's field) replaced, removed or added, put into the ``lora_studio`` text chunk of a PNG and taken
  through :func:`studio.generation.recipes.read_recipe`, the cost check, the base-model reference and the adapter
  stack's resolution: everything up to the point where a pipeline would run.
- safetensors files: valid headers with one entry, field or the length prefix mutated, and arbitrary
  bytes, through :func:`adapters.filesafety.check_safetensors` and the importer's detection. A file the
  check lets through must then open in the safetensors library: the check is never looser than it.

The default run tries a few hundred inputs in seconds; the ``slow`` siblings try many thousands. Each
test prints how many inputs it tried (``pytest -s``); :data:`TRIED` keeps the counts.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.core.errors import StudioError

TRIED: Counter = Counter()  # test name -> inputs tried
TINY_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

QUICK = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
THOROUGH = settings(max_examples=5000, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values: scalars at the leaves (integers far past 64 bits, floats with NaN and infinities, any
# text including lone surrogates), lists and objects around them.
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**80, max_value=2**80),
                         st.floats(), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="lora-studio-fuzz-"))


def _count(name: str) -> None:
    TRIED[name] += 1


# --------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------


def _valid_request() -> dict:
    from studio.generation.requests import GenerationRequest

    entry = {"ref": "style@1", "weight": 0.8, "blocks": {"down": 0.5, "up": {"block_0": 0.2}}, "name": "style",
             "version": 1, "tensor_sha256": "ab" * 32}
    return GenerationRequest(prompt="a red circle on a blue background", negative_prompt="green", seed=3,
                             num_inference_steps=4, width=32, height=32, guidance_scale=2.0,
                             adapters=[entry]).to_dict()


REQUEST_FIELDS = sorted(_valid_request())
ENTRY_FIELDS = ["ref", "weight", "unet", "text_encoder", "blocks", "name", "version", "tensor_sha256", "other"]


@st.composite
def mutated_recipes(draw) -> str:
    """A valid recipe with one thing changed, as the chunk's text."""
    payload = {"version": 1, "request": _valid_request(), "model_hash": "", "versions": {}}
    request = payload["request"]
    where = draw(st.sampled_from(["field", "drop", "extra", "entry", "payload", "img2img"]))
    if where == "field":
        request[draw(st.sampled_from(REQUEST_FIELDS))] = draw(json_values)
    elif where == "drop":
        request.pop(draw(st.sampled_from(REQUEST_FIELDS)))
    elif where == "extra":
        request[draw(st.text(max_size=12))] = draw(json_values)
    elif where == "entry":
        request["adapters"][0][draw(st.sampled_from(ENTRY_FIELDS))] = draw(json_values)
    elif where == "img2img":
        request.update(init_image=draw(st.one_of(st.text(max_size=80), st.just("ab" * 32 + ".png"))),
                       init_image_sha256=draw(st.one_of(st.none(), st.just("ab" * 32), st.text(max_size=70))),
                       strength=draw(st.one_of(st.none(), st.floats(), st.integers())),
                       num_inference_steps=draw(st.integers(min_value=-2, max_value=2000)),
                       width=draw(st.integers(min_value=-8, max_value=10**6)))
    else:
        payload = draw(st.one_of(json_values, st.just({"request": draw(json_values)})))
    return json.dumps(payload, ensure_ascii=draw(st.booleans()))


recipe_texts = st.one_of(mutated_recipes(), json_values.map(json.dumps), st.text(max_size=200))


def _through_recipe(folder: Path, text: str) -> None:
    """Read ``text`` as a PNG's recipe and take it as far as the studio goes before a pipeline runs."""
    from adapters.compose import resolve_adapter
    from studio.core.base_models import resolve
    from studio.generation.recipes import RECIPE_KEY, check_recipe_cost, read_recipe

    info = PngInfo()
    info.add_text(RECIPE_KEY, text)
    path = folder / "recipe.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    try:
        request = read_recipe(path)
        check_recipe_cost(request, confirmed=False)
        resolve(request.base_model)
        for entry in request.adapters:
            resolve_adapter(entry.ref)
    except StudioError:
        pass


def _recipe_fuzz(name: str, runs) -> None:
    folder = _scratch()

    @runs
    @given(recipe_texts)
    def check(text):
        _count(name)
        _through_recipe(folder, text)

    check()
    print(f"\n{name}: {TRIED[name]} recipe inputs tried")


def test_recipe_fuzz():
    _recipe_fuzz("recipes", QUICK)


@pytest.mark.slow
def test_recipe_fuzz_thorough():
    _recipe_fuzz("recipes (thorough)", THOROUGH)


# --------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------


def _valid_header() -> tuple[dict, int]:
    """A rank-1 LoRA module of the tiny UNet with metadata, and its data length in bytes."""
    return {
        "__metadata__": {"lora_adapter_metadata": json.dumps({"unet.r": 1, "unet.lora_alpha": 1}),
                         "ss_tag_frequency": json.dumps({"1_x": {"zzq": 3}}), "modelspec.trigger_phrase": "zzq"},
        f"unet.{TINY_Q}.lora_A.weight": {"dtype": "F32", "shape": [1, 64], "data_offsets": [0, 256]},
        f"unet.{TINY_Q}.lora_B.weight": {"dtype": "F32", "shape": [64, 1], "data_offsets": [256, 512]},
    }, 512


TENSORS = [f"unet.{TINY_Q}.lora_A.weight", f"unet.{TINY_Q}.lora_B.weight"]
small_ints = st.one_of(st.integers(min_value=-4, max_value=600), st.integers(), st.booleans())


@st.composite
def mutated_files(draw) -> bytes:
    """A valid adapter file with one thing changed in its header, its length prefix or its data."""
    header, data_len = _valid_header()
    where = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "metadata", "meta_value", "key", "length",
                                  "data", "value"]))
    tensor = draw(st.sampled_from(TENSORS))
    if where == "dtype":
        header[tensor]["dtype"] = draw(st.one_of(st.sampled_from(["F16", "BF16", "I64", "BOOL", "F4", "f32", ""]),
                                                 json_values))
    elif where == "shape":
        header[tensor]["shape"] = draw(st.one_of(st.lists(small_ints, max_size=5), json_values))
    elif where == "offsets":
        header[tensor]["data_offsets"] = draw(st.one_of(st.lists(small_ints, max_size=3), json_values))
    elif where == "entry":
        header[tensor] = draw(json_values)
    elif where == "metadata":
        header["__metadata__"] = draw(json_values)
    elif where == "meta_value":
        key = draw(st.sampled_from(["lora_adapter_metadata", "ss_tag_frequency", "modelspec.trigger_phrase",
                                    "ssmd_keywords"]))
        header["__metadata__"][key] = draw(st.one_of(json_values.map(json.dumps), st.text(max_size=60)))
    elif where == "key":
        header[draw(st.text(max_size=60))] = header.pop(tensor)
    elif where == "value":
        header[tensor][draw(st.text(max_size=12))] = draw(json_values)
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    length = len(raw)
    if where == "length":
        length = draw(st.one_of(st.integers(min_value=0, max_value=len(raw) + 600),
                                st.integers(min_value=0, max_value=2**64 - 1)))
    if where == "data":
        data_len = draw(st.integers(min_value=0, max_value=1024))
    return struct.pack("<Q", length) + raw + bytes(data_len)


weights_files = st.one_of(mutated_files(), st.binary(max_size=300),
                          st.binary(max_size=200).map(lambda b: struct.pack("<Q", len(b)) + b))


def _through_header(folder: Path, blob: bytes) -> None:
    """Check ``blob`` as a weights file; what passes must open in safetensors, then go through detection."""
    from safetensors import safe_open

    from adapters import formats
    from studio.core import filesafety

    path = folder / "adapter.safetensors"
    path.write_bytes(blob)
    try:
        header = filesafety.check_safetensors(path)
    except StudioError:
        return
    with safe_open(str(path), framework="pt") as f:  # the check is never looser than the library
        assert set(f.keys()) == set(header.tensors)
        for key in f.keys():
            f.get_tensor(key)
    try:
        formats.detect(path)
    except StudioError:
        pass


def _header_fuzz(name: str, runs) -> None:
    folder = _scratch()

    @runs
    @given(weights_files)
    def check(blob):
        _count(name)
        _through_header(folder, blob)

    check()
    print(f"\n{name}: {TRIED[name]} safetensors inputs tried")


def test_safetensors_header_fuzz():
    _header_fuzz("safetensors headers", QUICK)


@pytest.mark.slow
def test_safetensors_header_fuzz_thorough():
    _header_fuzz("safetensors headers (thorough)", THOROUGH)
