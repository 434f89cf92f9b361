"""The embedded tiny model: its tokenizer is SD-1's, its recipe runs, and prompts control images."""

from __future__ import annotations

import gzip
import json

import pytest

from studio.app.tiny.quality import QUALITY_PROMPTS, measure_quality
from studio.app.tiny.tokenizer import bytes_to_unicode, convert_openai_bpe
from studio.core.embedded import TINY_MODEL_DIR


def test_tokenizer_is_sd1_vocabulary():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TINY_MODEL_DIR / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    # Ids of SD-1's CLIP vocabulary: "a</w>" = 320, "red</w>" = 736, "circle</w>" = 7117.
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    # An unusual trigger word splits into sub-words as it would on a real SD-1 model.
    assert tok.convert_ids_to_tokens(tok("zorblax").input_ids[1:-1]) == ["zor", "bla", "x</w>"]


def test_weights_are_safetensors_and_small():
    files = list(TINY_MODEL_DIR.rglob("*"))
    assert not [f for f in files if f.suffix in (".bin", ".ckpt", ".pt")]
    size = sum(f.stat().st_size for f in files if f.is_file())
    assert size < 20 * 2**20
    report = json.loads((TINY_MODEL_DIR / "build_report.json").read_text())
    assert report["config"]["seed"] == 0


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256


def test_converter_refuses_a_wrong_merge_file(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not OpenAI's"):
        convert_openai_bpe(bad, tmp_path / "out")


def test_recipe_smoke_run_builds_a_loadable_pipeline(tmp_path):
    from studio.app.tiny.build import main
    from studio.generation.requests import GenerationRequest
    from studio.generation.run import generate

    out = tmp_path / "tiny"
    main(["--smoke", "--out", str(out)])
    report = json.loads((out / "build_report.json").read_text())
    assert report["parameters"]["unet"] > 0 and report["scaling_factor"] > 0
    assert not (out / "tokenizer" / "tokenizer.json").exists()
    result = generate(GenerationRequest(prompt="a red circle on a blue background", base_model=str(out), seed=1,
                                        num_inference_steps=2))
    assert result.images[0].size == (32, 32)


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-flux", "tiny-sd3"])
def test_prompts_control_every_tiny_model_at_one_seed(model):
    """The faster sibling of each family's 36-image measurement (slow: this file's, test_sdxl.py's,
    test_flux.py's and test_sd3.py's): the 12 prompts at seed 1, 10-20 s a model. Seen here at seed 1:
    colour and background 100% on all four, shape 75-100%."""
    rates = measure_quality(model, seeds=(1,), steps=20)
    assert rates["images"] == len(QUALITY_PROMPTS) == 12
    assert rates["colour"] >= 0.90 and rates["background"] >= 0.90, rates
    assert rates["shape"] >= 0.65, rates


@pytest.mark.slow
def test_prompts_control_the_image():
    """36 images (12 prompts x 3 seeds, 20 Euler steps): colour, background and shape rates."""
    rates = measure_quality("tiny", seeds=(1, 2, 3), steps=20)
    assert rates["images"] == len(QUALITY_PROMPTS) * 3 == 36
    assert rates["colour"] >= 0.90, rates
    assert rates["background"] >= 0.90, rates
    assert rates["shape"] >= 0.80, rates
