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
def reg(studio_home, request):
    """An empty registry in the test's studio home (on the test's ``registry_backend`` when it has one)."""
    from adapters.registry import Registry

    if "registry_backend" in request.fixturenames:
        request.getfixturevalue("registry_backend")
    with Registry() as registry:
        yield registry


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL server for the session (tests/pg_server.py), or a skip saying why not."""
    from pg_server import PostgresServer, find_bin

    # On a developer's machine without the package the PostgreSQL cases skip, saying why; CI must run
    # them (scripts/test installs the package there), so there a missing server fails the tests.
    give_up = pytest.fail if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip
    bin_dir = find_bin()
    if bin_dir is None:
        give_up("PostgreSQL is not installed (scripts/test installs Debian's postgresql as root)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        give_up("psycopg is not installed (the test extra: pip install -e .[test])")
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except Exception as e:  # noqa: BLE001 - a server that cannot start is a skip (or, in CI, a failure) with its reason
        server.stop()
        give_up(f"could not start PostgreSQL from {bin_dir}: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_backend(request, studio_home, monkeypatch):
    """Run a registry test on SQLite (the studio's default) and on a fresh PostgreSQL database: the
    test's ``Registry()`` (and any child process it starts) reads ``LORA_STUDIO_REGISTRY_URL``. Tests
    marked ``sqlite_only`` check what only SQLite has (its file, WAL, its own error texts)."""
    from studio.core.settings import reload_settings

    if request.param == "sqlite":
        yield "sqlite"
        return
    if request.node.get_closest_marker("sqlite_only"):
        pytest.skip("checks SQLite's own behaviour")
    server = request.getfixturevalue("postgres_server")
    url = server.new_database()
    monkeypatch.setenv("LORA_STUDIO_REGISTRY_URL", url)
    reload_settings()
    yield "postgresql"
    server.drop_database(url)  # WITH (FORCE): a client the test left open does not keep it


@pytest.fixture(scope="session")
def flux_smoke(tmp_path_factory):
    """One smoke build of tiny-flux (the recipe's few-step settings) for every Flux test module: the
    plumbing, not image quality. Tests read it and never write into it."""
    from studio.app.tiny.build import main

    out = tmp_path_factory.mktemp("flux-smoke") / "tiny-flux"
    main(["--model", "tiny-flux", "--smoke", "--out", str(out)])
    return out
