"""The registry's audit trail and protected aliases: every register, alias move, protection change,
delete and publish recorded with who, when and what changed, in the change's own transaction; aliases
production reads move or go only with force; ``lora-studio adapters history``."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from test_registry import register_file

from adapters.registry import Registry, audit_events
from studio.core.errors import AdapterNotFoundError, AliasInUseError, ProtectedAliasError
from studio.core.settings import reload_settings

# On SQLite and on a real PostgreSQL server (conftest's registry_backend).
pytestmark = pytest.mark.usefixtures("registry_backend")


def _events(reg, name):
    return [(e.actor, e.action, e.version, e.detail) for e in reg.history(name)]


def test_each_kind_of_change_is_recorded_with_its_author(studio_home, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_USER", "ada")
    reload_settings()
    with Registry() as ada, Registry(actor="grace") as grace:
        register_file(ada, "style", 1, tmp_path)
        register_file(grace, "style", 2, tmp_path, parents=["style@1"])
        ada.set_alias("style@1", "prod", protect=True)
        grace.set_alias("style@2", "prod", force=True)
        grace.set_alias("style@2", "prod", protect=False, force=True)
        ada.set_alias("style@1", "staging")
        ada.remove_alias("style", "staging")
        grace.record_publication("style@2", repo_id="team/style", tag="v2", commit="c" * 40, url="https://h/s")
        ada.delete("style@1")
        events = _events(grace, "style")
        assert [(who, action, version) for who, action, version, _ in events] == [
            ("ada", "register", 1), ("grace", "register", 2), ("ada", "tag", 1), ("ada", "protect", 1),
            ("grace", "tag", 2), ("grace", "unprotect", 2), ("ada", "tag", 1), ("ada", "untag", 1),
            ("grace", "publish", 2), ("ada", "delete", 1)]
        details = [d for *_, d in events]
        assert details[1]["parents"] == ["style@1"] and details[1]["origin"] == "imported"
        assert details[4] == {"alias": "prod", "from": 1, "to": 2, "protected": True, "forced": True}
        assert details[5]["protected"] is False and details[5]["forced"] is True
        assert details[7] == {"alias": "staging", "was": 1, "protected": False, "forced": False}
        assert details[8]["repo_id"] == "team/style" and details[8]["commit"] == "c" * 40
        assert details[9] == {"versions": [1], "aliases_removed": [], "forced": False}
        assert all(e.at.tzinfo is not None for e in grace.history("style"))
        assert [e.action for e in grace.history("style", limit=2)] == ["publish", "delete"]
        # Setting an alias where it already points records nothing.
        grace.set_alias("style@2", "prod")
        assert len(grace.history("style")) == 10
        # The history outlives the adapter.
        grace.delete("style", force=True)
        assert grace.history("style")[-1].detail == {"versions": [2], "aliases_removed": ["prod"], "forced": True}
        with pytest.raises(AdapterNotFoundError):
            grace.history("never-was")


def test_a_protected_alias_moves_or_goes_only_with_force(reg, tmp_path):
    register_file(reg, "style", 1, tmp_path)
    register_file(reg, "style", 2, tmp_path)
    reg.set_alias("style@1", "prod", protect=True)
    assert reg.adapter("style").protected == ("prod",)
    for change in (lambda: reg.set_alias("style@2", "prod"), lambda: reg.remove_alias("style", "prod"),
                   lambda: reg.set_alias("style@1", "prod", protect=False)):
        with pytest.raises(ProtectedAliasError, match=r"style@prod is protected: pass --force"):
            change()
    with pytest.raises(AliasInUseError, match="--force"):
        reg.delete("style@1")
    assert reg.adapter("style").aliases["prod"] == 1 and len(reg.history("style")) == 4  # refusals change nothing
    reg.set_alias("style@1", "prod", protect=True)  # already so: allowed, nothing recorded
    moved = reg.set_alias("style@2", "prod", force=True)
    assert "prod" in moved.aliases and reg.adapter("style").protected == ("prod",)  # still protected
    assert reg.remove_alias("style", "prod", force=True) == 2 and reg.adapter("style").protected == ()


def test_a_failed_change_records_nothing(reg, tmp_path, monkeypatch):
    register_file(reg, "style", 1, tmp_path)
    # The change and its record are one transaction: a failure writing the record undoes the change.
    original = reg._audit

    def broken(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(reg, "_audit", broken)
    with pytest.raises(RuntimeError):
        reg.set_alias("style@1", "prod")
    monkeypatch.undo()
    assert "prod" not in reg.adapter("style").aliases and [e.action for e in reg.history("style")] == ["register"]


@pytest.mark.sqlite_only
def test_a_version_2_registry_gains_the_audit_trail_and_protection(studio_home, tmp_path):
    with Registry() as reg:
        register_file(reg, "style", 1, tmp_path)
        reg.set_alias("style@1", "prod")
    engine = sa.create_engine(f"sqlite:///{studio_home / 'registry.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE audit_events")
        conn.exec_driver_sql("ALTER TABLE aliases DROP COLUMN protected")
        conn.exec_driver_sql("UPDATE registry_info SET value = '2' WHERE key = 'schema_version'")
    engine.dispose()
    with Registry(actor="ops") as reg:
        assert reg.adapter("style").aliases == {"latest": 1, "prod": 1} and reg.adapter("style").protected == ()
        reg.set_alias("style@1", "prod", protect=True)
        assert [(e.actor, e.action) for e in reg.history("style")] == [("ops", "protect")]
        with reg._engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(audit_events)).scalar() == 1


def test_cli_tag_protect_untag_force_and_history(reg, tmp_path, capsys, monkeypatch):
    from studio.app.cli import main

    monkeypatch.setenv("LORA_STUDIO_USER", "ada")
    reload_settings()
    register_file(reg, "cli-style", 1, tmp_path)
    register_file(reg, "cli-style", 2, tmp_path)
    capsys.readouterr()
    assert main(["adapters", "tag", "cli-style@1", "prod", "--protect"]) == 0
    assert "cli-style@prod -> cli-style@1 (protected)" in capsys.readouterr().out
    assert main(["adapters", "tag", "cli-style@2", "prod"]) == 2
    assert "cli-style@prod is protected: pass --force" in capsys.readouterr().err
    assert main(["adapters", "untag", "cli-style", "prod"]) == 2
    assert main(["adapters", "tag", "cli-style@2", "prod", "--force"]) == 0
    assert main(["adapters", "untag", "cli-style", "prod", "--force"]) == 0
    capsys.readouterr()
    assert main(["adapters", "history", "cli-style"]) == 0
    out = capsys.readouterr().out
    for line in ("registered cli-style@1", "moved cli-style@prod to @1", "protected cli-style@prod (on @1)",
                 "moved cli-style@prod from @1 to @2 (forced)", "removed cli-style@prod (was @2) (forced)"):
        assert line in out, out
    assert main(["adapters", "history", "cli-style", "--json", "--limit", "1"]) == 0
    (last,) = json.loads(capsys.readouterr().out)
    assert last["actor"] == "ada" and last["action"] == "untag" and last["detail"]["forced"] is True


def test_labels_change_and_each_change_is_recorded(reg, tmp_path, capsys):
    from studio.app.cli import main
    from studio.core.errors import InvalidRequestError

    register_file(reg, "style", 1, tmp_path, tags=["anime"])
    v = reg.set_labels("style@1", add=["Portrait", "ANIME"], remove=["anime"])
    assert list(v.tags) == ["Portrait", "ANIME"]
    assert [x.ref for x in reg.list_versions(tag="portrait").items] == ["style@1"]
    with pytest.raises(InvalidRequestError, match="has no label watercolour; it has: Portrait, ANIME"):
        reg.set_labels("style@1", remove=["watercolour"])
    reg.set_labels("style@1", add=["portrait"])  # already there (case-insensitive): nothing recorded
    assert [e.action for e in reg.history("style")] == ["register", "label"]
    assert reg.history("style")[-1].detail == {"added": ["Portrait", "ANIME"], "removed": ["anime"],
                                               "labels": ["Portrait", "ANIME"]}
    capsys.readouterr()
    assert main(["adapters", "label", "style@1", "--remove", "Portrait"]) == 0
    assert "style@1 labels: ANIME" in capsys.readouterr().out
    assert main(["adapters", "history", "style"]) == 0
    assert "relabelled style@1: -Portrait" in capsys.readouterr().out


def test_the_whole_catalogs_history_by_person_and_kind(reg, tmp_path, capsys):
    from studio.app.cli import main
    from studio.core.errors import InvalidRequestError

    with Registry(actor="ada") as ada, Registry(actor="grace") as grace:
        register_file(ada, "style", 1, tmp_path)
        register_file(grace, "other", 2, tmp_path)
        grace.set_alias("other@1", "prod")
        ada.delete("style")
        events = [(e.actor, e.action, e.adapter) for e in reg.history()]
        assert events == [("ada", "register", "style"), ("grace", "register", "other"), ("grace", "tag", "other"),
                          ("ada", "delete", "style")]  # a deleted adapter's changes stay in the catalog's
        assert [e.action for e in reg.history(actor="grace")] == ["register", "tag"]
        assert [e.adapter for e in reg.history(action="register", limit=1)] == ["other"]
        assert reg.history("style", action="tag") == []  # known, nothing of that kind
        with pytest.raises(InvalidRequestError, match="no kind of change 'rename': choose one of register, tag"):
            reg.history(action="rename")
    capsys.readouterr()
    assert main(["adapters", "history", "--by", "ada"]) == 0
    out = capsys.readouterr().out
    assert "registered style@1" in out and "deleted style@1" in out and "other" not in out
    assert main(["adapters", "history", "--action", "tag", "--json"]) == 0
    (tag,) = json.loads(capsys.readouterr().out)
    assert (tag["actor"], tag["adapter"], tag["summary"]) == ("grace", "other", "moved other@prod to @1")


def test_a_move_racing_a_protection_waits_for_it_and_is_refused(reg, tmp_path):
    import threading

    for n in (1, 2, 3):
        register_file(reg, "style", n, tmp_path)
    reg.set_alias("style@1", "prod")
    inside, release, errors = threading.Event(), threading.Event(), []
    with Registry(actor="ada") as ada, Registry(actor="grace") as grace:
        original = ada._audit

        def slow_audit(*args, **kwargs):  # ada's change is made but not committed yet
            original(*args, **kwargs)
            inside.set()
            release.wait(30)

        ada._audit = slow_audit

        def move():
            try:
                grace.set_alias("style@3", "prod")
            except Exception as e:  # noqa: BLE001 - what grace is told
                errors.append(e)

        protecting = threading.Thread(target=lambda: ada.set_alias("style@2", "prod", protect=True))
        protecting.start()
        assert inside.wait(30)
        moving = threading.Thread(target=move)
        moving.start()
        moving.join(1.0)
        assert moving.is_alive()  # grace waits for ada's change instead of reading around it
        release.set()
        protecting.join(30)
        moving.join(60)
    assert [type(e).__name__ for e in errors] == ["ProtectedAliasError"]
    assert reg.adapter("style").aliases["prod"] == 2 and reg.adapter("style").protected == ("prod",)
