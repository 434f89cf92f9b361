"""The lora-studio command: generate, recipes, prompts files, listings, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from studio.app.cli import main


def test_generate_writes_pngs_and_json(tmp_path, capsys):
    code = main(["generate", "a red circle on a blue background", "--seed", "1", "--num-images", "2",
                 "--steps", "4", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["seed"] for r in rows] == [1, 2]
    assert all(Image.open(r["path"]).format == "PNG" for r in rows)


def test_recipe_rerun_is_bit_exact(tmp_path, capsys):
    main(["generate", "a green square on a white background", "--seed", "5", "--steps", "6",
          "--scheduler", "DPM++ 2M", "--out", str(tmp_path / "a"), "--json"])
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["path"]
    main(["generate", "--recipe", first, "--out", str(tmp_path / "b"), "--json"])
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["path"]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_prompts_file_applies_the_seed_rule_per_prompt(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\n# a comment\na black square on a yellow background\n")
    main(["generate", "--prompts-file", str(prompts), "--seed", "3", "--num-images", "2", "--steps", "3",
          "--out", str(tmp_path / "grid"), "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["prompt"].split()[1], r["seed"]) for r in rows] == [("red", 3), ("red", 4), ("black", 3), ("black", 4)]
    assert len({r["path"] for r in rows}) == 4


def test_base_models_list_json(capsys):
    assert main(["base-models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["ref"] == "tiny" and rows[0]["family"] == "sd1"


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "studio.app.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, capsys):
    not_png = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(not_png)
    # One of each kind in a process of its own, where a library's warning or log line would show (a
    # request check, the Hub offline, a recipe file, argparse); the rest through main() in this process.
    in_a_process = [
        (["generate", "x", "--width", "30", "--out", str(tmp_path)], "multiple of 8"),
        (["generate", "x", "--base", "nowhere/at-all", "--out", str(tmp_path)], "offline"),
        (["generate", "--recipe", str(not_png), "--out", str(tmp_path)], "not a PNG"),
        (["generate", "x", "--seed", "abc", "--out", str(tmp_path)], "not a whole number"),
    ]
    here = [
        (["generate", "x", "--steps", "0", "--out", str(tmp_path)], "steps must be"),
        (["generate", "x", "--base", "./missing-model", "--out", str(tmp_path)], "not found"),
        (["generate", "--recipe", str(tmp_path / "none.png"), "--out", str(tmp_path)], "does not exist"),
        (["generate", "x", "--scheduler", "Fast", "--out", str(tmp_path)], "unknown scheduler"),
    ]
    for argv, message in in_a_process:
        proc = _run_cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert message in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for argv, message in here:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_corrupt_weights_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    proc = _run_cli("generate", "x", "--base", str(bad), "--out", str(tmp_path))
    assert proc.returncode == 2 and "cannot be read as safetensors" in proc.stderr and "Traceback" not in proc.stderr


def _ui_argv(monkeypatch, *args):
    """(exit status, the streamlit command line `lora-studio ui ARGS` would exec, or None)."""
    import os

    seen = []
    monkeypatch.setattr(os, "execv", lambda path, argv: seen.append(argv))
    status = main(["ui", *args])
    return status, (seen[0] if seen else None)


def _option(argv, name):
    return argv[argv.index(name) + 1]


def test_ui_hides_error_details_and_takes_large_uploads(monkeypatch, capsys):
    status, argv = _ui_argv(monkeypatch)
    assert status == 0
    # "none": tracebacks stay on the server's console; "false" would still show them ("stacktrace").
    assert _option(argv, "--client.showErrorDetails") == "none"
    from studio.app.dataset_files import MAX_EXPANDED_BYTES

    assert int(_option(argv, "--server.maxUploadSize")) * 1024**2 >= MAX_EXPANDED_BYTES  # a dataset zip fits
    assert _option(argv, "--server.address") == "127.0.0.1"
    assert capsys.readouterr().err == ""


def test_ui_on_a_non_loopback_address_needs_allow_remote(monkeypatch, capsys):
    for address in ("localhost", "127.0.0.2", "::1"):
        status, argv = _ui_argv(monkeypatch, "--address", address)
        assert status == 0 and _option(argv, "--server.address") == address
        assert capsys.readouterr().err == ""
    for address in ("0.0.0.0", "192.168.1.20", "::", "studio.example.org"):
        status, argv = _ui_argv(monkeypatch, "--address", address)
        err = capsys.readouterr().err
        assert status == 2 and argv is None, address
        assert "--allow-remote" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    status, argv = _ui_argv(monkeypatch, "--address", "0.0.0.0", "--allow-remote")
    err = capsys.readouterr().err
    assert status == 0 and _option(argv, "--server.address") == "0.0.0.0"
    assert "warning" in err and "no login" in err


def _recipe_png(path, **overrides):
    from PIL.PngImagePlugin import PngInfo

    from studio.generation.recipes import RECIPE_KEY
    from studio.generation.requests import GenerationRequest

    request = {**GenerationRequest(prompt="a red circle on a blue background", seed=1, width=32, height=32,
                                   guidance_scale=2.0).to_dict(), **overrides}
    info = PngInfo()
    info.add_text(RECIPE_KEY, json.dumps({"version": 1, "request": request}))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_a_costly_recipe_runs_only_with_yes(tmp_path, capsys, monkeypatch):
    from studio.generation import run as gen

    costly = _recipe_png(tmp_path / "costly.png", num_inference_steps=1000, width=4096, height=4096)
    assert main(["generate", "--recipe", str(costly), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--yes" in err and "1000 steps at 4096x4096" in err and err.count("\n") == 1
    ran = []
    monkeypatch.setattr(gen, "generate", lambda request, progress=None: ran.append(request) or gen.GenerationResult(
        request=request, outputs=[], seconds=0.0))
    assert main(["generate", "--recipe", str(costly), "--out", str(tmp_path / "out"), "--yes"]) == 0
    assert [r.num_inference_steps for r in ran] == [1000]


def test_hostile_recipes_are_one_line_exit_2(tmp_path):
    import struct
    import zlib

    from PIL.PngImagePlugin import PngInfo

    deep = tmp_path / "deep.png"
    info = PngInfo()
    info.add_text("lora_studio", "[" * 100_000 + "]" * 100_000)
    Image.new("RGB", (8, 8)).save(deep, pnginfo=info)
    bomb = _recipe_png(tmp_path / "bomb.png")
    data = bytearray(bomb.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    bomb.write_bytes(bytes(data))
    cases = [(deep, "nests deeper"), (bomb, "100000x100000"),
             (_recipe_png(tmp_path / "base.png", base_model=5), "'base_model'"),
             (_recipe_png(tmp_path / "negative.png", negative_prompt=["blurry"]), "'negative_prompt'")]
    for recipe, message in cases:
        proc = _run_cli("generate", "--recipe", str(recipe), "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, (recipe, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_ui_turns_off_the_full_collection_after_every_script_run(monkeypatch):
    # Streamlit's default gc.collect(2) after each run holds the GIL ~0.45 s with torch loaded; the
    # Generate page's progress fragment reruns twice a second, which starved the generation queue's
    # worker thread (the end-to-end browser test timed out at 25 s a denoising step).
    status, argv = _ui_argv(monkeypatch)
    assert status == 0
    assert _option(argv, "--runner.postScriptGC") == "false"
