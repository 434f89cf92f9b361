"""The install stays sound: the datasets folder never shadows Hugging Face datasets, torch is pinned."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_datasets_is_hugging_face_library():
    # Run from the repository root, where a datasets/ package would shadow the library.
    code = "import datasets, sys; print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path, has_loader = out.strip().splitlines()
    assert "site-packages" in path and has_loader == "True"
    assert not (ROOT / "datasets" / "__init__.py").exists()
    assert not (ROOT / "datasets.py").exists()


def test_constraints_pin_torch_and_core_libraries():
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert pins["torch"] == "2.13.0"
    for name in ("diffusers", "peft", "accelerate", "transformers", "safetensors", "streamlit"):
        assert name in pins


def test_pyproject_ships_the_three_packages_and_the_console_script():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from setuptools import find_packages

    packages = find_packages(str(ROOT), include=meta["tool"]["setuptools"]["packages"]["find"]["include"])
    for name in ("studio", "trainer", "adapters", "studio.core", "studio.core.embedded", "studio.generation",
                 "studio.app", "studio.app.ui"):
        assert name in packages
        assert (ROOT / name.replace(".", "/") / "__init__.py").exists()
    assert meta["project"]["scripts"]["lora-studio"] == "studio.app.cli:main"
    assert "datasets" not in packages


def test_package_data_ships_every_embedded_model_file():
    """A wheel install (not only an editable one) gets every file of every embedded model."""
    from pathlib import PurePosixPath

    from studio.core.embedded import EMBEDDED_DIR, EMBEDDED_MODELS

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = meta["tool"]["setuptools"]["package-data"]["studio.core.embedded"]
    for folder in EMBEDDED_MODELS.values():
        files = [p.relative_to(EMBEDDED_DIR).as_posix() for p in folder.rglob("*") if p.is_file()]
        assert files, folder
        for name in files:
            path = PurePosixPath(name)
            assert any(len(path.parts) == len(PurePosixPath(p).parts) and path.match(p) for p in patterns), name


def test_readme_states_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "scripts/studio" in readme and "scripts/test" in readme
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_library_imports_without_streamlit():
    code = (
        "import sys; import studio.generation.run, studio.core.base_models, studio.app.cli, trainer, adapters; "
        "print('streamlit' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
