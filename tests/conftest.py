"""Test-wide settings: offline, a private studio home per test session, one torch thread pool."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest installs the page it ran as ``sys.modules["__main__"]`` and leaves it there;
    a later ``multiprocessing`` spawn would then re-run that page in every child (they died with a
    NameError in the concurrent-registration test). Each test starts and ends with pytest's own main."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets an empty LORA_STUDIO_HOME, so nothing leaks between tests or into ~."""
    from studio.core.settings import reload_settings

    home = tmp_path / "home"
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    # A developer's LORA_STUDIO_REGISTRY_URL must never receive test writes.
    monkeypatch.delenv("LORA_STUDIO_REGISTRY_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reload_settings()
    yield home
    reload_settings()


@pytest.fixture(scope="session")
def tiny_pipe():
    from studio.core.base_models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture
def reg(studio_home):
    """An empty registry in the test's studio home."""
    from adapters.registry import Registry

    with Registry() as registry:
        yield registry


@pytest.fixture(scope="session")
def flux_smoke(tmp_path_factory):
    """One smoke build of tiny-flux (the recipe's few-step settings) for every Flux test module: the
    plumbing, not image quality. Tests read it and never write into it."""
    from studio.app.tiny.build import main

    out = tmp_path_factory.mktemp("flux-smoke") / "tiny-flux"
    main(["--model", "tiny-flux", "--smoke", "--out", str(out)])
    return out
