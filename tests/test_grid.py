"""X/Y grids: cells equal single generations, labels drawn, recipes per cell, axes validated; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_compose import _save_lora

from adapters.compose import AdapterSpec, engine_for
from adapters.ingest import import_adapter
from studio.core.base_models import load_fresh_pipeline, load_pipeline
from studio.core.errors import InvalidRequestError
from studio.generation.grid import GRID_KEY, GridAxis, render_grid
from studio.generation.recipes import read_recipe
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def styles(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    yield [_save_lora(load_fresh_pipeline("tiny"), root, seed=s) for s in (41, 42)]
    engine_for(load_pipeline("tiny")).unload_all()  # leave the shared pipeline clean


def _request(adapters=(), **kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "seed": 3, "num_inference_steps": 4, "guidance_scale": 2.0,
                                "adapters": list(adapters), **kw})


def test_axis_parse_and_validation():
    assert GridAxis.parse("strength=0,0.5,1") == GridAxis("strength", (0.0, 0.5, 1.0))
    assert GridAxis.parse("strength@2=1,-1").entry == 1
    assert GridAxis.parse("version=1,2,prod").values == (1, 2, "prod")
    assert GridAxis.parse("prompt=a red circle, big|a blue square").values == ("a red circle, big", "a blue square")
    for text, message in [("strength", "KIND=V1,V2"), ("colour=1,2", "unknown grid axis"), ("seed=1,x", "seed=1,x"),
                          ("strength=9", r"\[-4, 4\]"), ("seed=1,1", "repeats"), ("strength@0=1", "N >= 1"),
                          ("seed=1,,2", "empty value")]:
        with pytest.raises(InvalidRequestError, match=message):
            GridAxis.parse(text)


def test_strength_by_seed_grid_cells_equal_single_generations(styles, tmp_path):
    stack = [AdapterSpec(str(styles[0]), 1.0, text_encoders=0.3)]
    loads = engine_for(load_pipeline("tiny")).stats.loads
    seen = []
    result = render_grid(_request(stack), GridAxis("strength", (0.0, 0.5, 1.0)), GridAxis("seed", (3, 4)),
                         tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (6, 6) and len(seen) == 6
    assert [len(row) for row in result.image_paths] == [3, 3]
    assert result.x_labels == ["0", "0.5", "1"] and result.y_labels == ["3", "4"]
    assert engine_for(load_pipeline("tiny")).stats.loads - loads <= 1  # strengths change without re-reading
    for r, seed in enumerate((3, 4)):
        for c, weight in enumerate((0.0, 0.5, 1.0)):
            cell = read_recipe(result.image_paths[r][c])
            assert cell.seed == seed and cell.adapters[0].weight == weight and cell.adapters[0].text_encoders is None
            alone = generate(cell).images[0]
            assert np.array_equal(np.asarray(alone), np.asarray(Image.open(result.image_paths[r][c]).convert("RGB")))
    base = generate(_request(seed=4)).images[0]
    assert np.array_equal(np.asarray(base), np.asarray(Image.open(result.image_paths[1][0]).convert("RGB")))
    grid = Image.open(result.grid_path)
    info = json.loads(grid.text[GRID_KEY])
    assert info["x"]["kind"] == "strength" and info["cells"][1][2] == result.image_paths[1][2].name
    pixels = np.asarray(grid.convert("L"))
    assert grid.width >= 3 * 96 and grid.height >= 2 * 96
    assert (pixels[:20] < 100).any()  # the x title and labels are drawn above the cells
    assert (pixels[:, :20] < 100).any()  # the y labels are drawn left of them


def test_version_by_prompt_grid_uses_each_registered_version(styles, reg, tmp_path):
    for path in styles:
        import_adapter(reg, path, name="gridstyle")
    result = render_grid(_request([AdapterSpec("gridstyle", 1.0)]), GridAxis("version", (1, 2)),
                         GridAxis("prompt", (PROMPT, "a yellow square on a black background")), tmp_path)
    cells = [[read_recipe(p) for p in row] for row in result.image_paths]
    assert [c.adapters[0].version for c in cells[0]] == [1, 2]
    assert [row[0].prompt for row in cells] == [PROMPT, "a yellow square on a black background"]
    a, b = (np.asarray(Image.open(p)) for p in result.image_paths[0])
    assert not np.array_equal(a, b)
    assert result.x_labels == ["v1", "v2"]


def test_grid_errors(styles, tmp_path):
    with pytest.raises(InvalidRequestError, match="at least 1 adapter"):
        render_grid(_request(), GridAxis("strength", (0.0, 1.0)), None, tmp_path)
    with pytest.raises(InvalidRequestError, match="both axes vary"):
        render_grid(_request(), GridAxis("seed", (1, 2)), GridAxis("seed", (3, 4)), tmp_path)
    with pytest.raises(InvalidRequestError, match="is a file, which has no versions"):
        render_grid(_request([AdapterSpec(str(styles[0]))]), GridAxis("version", (1, 2)), None, tmp_path)
    assert not list(tmp_path.glob("*.png"))


def test_cli_grid_and_stack_flags(styles, tmp_path, capsys):
    from studio.app.cli import main

    assert main(["grid", PROMPT, "--x", "strength=0,1", "--y", "prompt=a red circle|a green square", "--steps", "4",
                 "--seed", "1", "--adapter", f"{styles[1]}:0.5", "--te-weight", "0", "--out", str(tmp_path),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Image.open(row["grid_path"]).format == "PNG" and len(row["image_paths"]) == 2
    assert row["y_labels"] == ["a red circle", "a green square"]
    assert main(["generate", PROMPT, "--blocks", '{"down": 0.5}', "--out", str(tmp_path)]) == 2
    assert "the stack is empty" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--adapter", str(styles[1]), "--blocks", "{down", "--out", str(tmp_path)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--adapter", f"{styles[1]}:7", "--out", str(tmp_path)]) == 2
    assert "[-4, 4]" in capsys.readouterr().err
    assert main(["generate", PROMPT, "--seed", "1", "--steps", "4", "--adapter", str(styles[1]), "--blocks",
                 '{"down": 0.5, "up": {"block_0": 0.0}}', "--out", str(tmp_path / "b"), "--json"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["path"]
    assert read_recipe(path).adapters[0].blocks == {"down": 0.5, "up": {"block_0": 0.0}}
