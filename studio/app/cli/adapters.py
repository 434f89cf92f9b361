"""``lora-studio adapters ...``: the registry's versions, aliases, files, merges and Hub publications.

The registry (SQLAlchemy, ~0.3 s to import) and the Hub client are imported inside the commands that
open them, so ``lora-studio --help`` and the other command groups never pay for them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from adapters.formats import DIFFUSERS_WEIGHT_NAME, METHOD_NAMES, check_against_reference, detect
from adapters.merge import METHODS, merge_adapters, parse_merge_arg
from adapters.registry import AUDIT_ACTIONS
from studio.app.cli.common import Parser, number, open_registry, quiet_libraries, whole_number
from studio.app.cli.output import print_fields, print_json, print_line, print_result, print_table, print_warning
from studio.core.errors import InvalidRequestError
from studio.core.families import FAMILIES, get_family

CATALOG_EVENTS = 50  # `adapters history` without a name: the catalog's newest changes, a screenful


def register(sub) -> None:
    """Add ``adapters`` and its subcommands to the ``lora-studio`` subcommands."""
    p = sub.add_parser("adapters", help="the adapter registry: versions, aliases, search")
    asub = p.add_subparsers(dest="adapters_command", required=True, parser_class=Parser)
    ls = asub.add_parser("list", help="list adapter versions, filtered, sorted and paged")
    ls.add_argument("--family", help="base-model family, e.g. sd1")
    ls.add_argument("--tag", help="only versions with this tag (case-insensitive)")
    ls.add_argument("--search", help="words that must all appear in the name or description")
    ls.add_argument("--type", dest="adapter_type", choices=("lora", "dora", "loha", "lokr"), help="adapter type")
    ls.add_argument("--trigger", help="only versions with this trigger word or phrase")
    ls.add_argument("--sort", choices=("name", "created", "newest"), default="name", help="order (default name)")
    ls.add_argument("--limit", type=whole_number, default=50, help="page size (default 50)")
    ls.add_argument("--offset", type=whole_number, default=0, help="rows to skip (default 0)")
    ls.add_argument("--json", action="store_true", help="print {total, limit, offset, items}")
    ls.set_defaults(func=cmd_adapters_list)
    show = asub.add_parser("show", help="show one version: name, name@3, name@alias or sha256:<prefix>")
    show.add_argument("ref", help="adapter reference")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_adapters_show)
    tag = asub.add_parser("tag", help="point an alias (e.g. prod) at a version; moves it if already set")
    tag.add_argument("ref", help="adapter reference, e.g. mystyle@3")
    tag.add_argument("alias", help="alias name (not a number, not 'latest')")
    guard = tag.add_mutually_exclusive_group()
    guard.add_argument("--protect", action="store_const", const=True, dest="protect",
                       help="protect the alias: tag, untag and delete then move or remove it only with --force")
    guard.add_argument("--unprotect", action="store_const", const=False, dest="protect",
                       help="lift the protection (needs --force)")
    tag.add_argument("--force", action="store_true", help="move or unprotect a protected alias (recorded)")
    tag.set_defaults(func=cmd_adapters_tag)
    untag = asub.add_parser("untag", help="remove an alias from an adapter")
    untag.add_argument("name", help="adapter name")
    untag.add_argument("alias", help="alias to remove")
    untag.add_argument("--force", action="store_true", help="remove a protected alias (recorded)")
    untag.set_defaults(func=cmd_adapters_untag)
    label = asub.add_parser("label", help="add or remove labels (what adapters list --tag filters by) of a version")
    label.add_argument("ref", help="adapter reference, e.g. mystyle@3")
    label.add_argument("--add", action="extend", nargs="+", default=[], metavar="LABEL")
    label.add_argument("--remove", action="extend", nargs="+", default=[], metavar="LABEL")
    label.set_defaults(func=cmd_adapters_label)
    hist = asub.add_parser("history", help="who registered, aliased, relabelled, deleted or published what, and when")
    hist.add_argument("name", nargs="?", default=None,
                      help="adapter name (a deleted adapter's history stays readable); none: the whole catalog's")
    hist.add_argument("--by", dest="actor", default=None, metavar="USER", help="only the changes USER made")
    hist.add_argument("--action", default=None, choices=AUDIT_ACTIONS, help="only this kind of change")
    hist.add_argument("--limit", type=whole_number, default=None,
                      help=f"only the newest N events (default: all of one adapter's, the newest {CATALOG_EVENTS} "
                           f"of the catalog's)")
    hist.add_argument("--json", action="store_true", help="print a JSON list of {at, actor, action, version, detail}")
    hist.set_defaults(func=cmd_adapters_history)
    imp = asub.add_parser("import", help="import a LoRA file (diffusers/peft or kohya .safetensors) as a new version, "
                                         "or every file of a folder (a catalog) with one report")
    imp.add_argument("path", type=Path, help="the adapter .safetensors file, the folder save_lora_weights wrote, or a "
                                             "folder of adapter files (searched recursively)")
    imp.add_argument("--name", help="adapter name (default: the file's ss_output_name, modelspec.title or file name)")
    imp.add_argument("--base", default="tiny",
                     help="base model the adapter must fit: tiny (default), a folder, a .safetensors file, a Hub id")
    imp.add_argument("--trigger", dest="triggers", action="extend", nargs="+", metavar="WORD",
                     help="trigger word or phrase (repeatable; replaces the file's declared ones)")
    imp.add_argument("--tag", dest="tags", action="extend", nargs="+", metavar="TAG",
                     help="label to filter by (repeatable; replaces the file's modelspec.tags)")
    imp.add_argument("--description", help="free text (default: the file's modelspec.description)")
    imp.add_argument("--json", action="store_true",
                     help="print the version record plus 'import': {format, warnings, suggested_trigger_words...}")
    imp.set_defaults(func=cmd_adapters_import)
    chk = asub.add_parser("check", help="check a LoRA file's names and shapes against a family's full-size model "
                                        "(built without weights: offline, seconds)")
    chk.add_argument("path", type=Path, help="the adapter .safetensors file")
    chk.add_argument("--family", required=True, choices=sorted(FAMILIES),
                     help="the family whose full-size reference model it must fit (sdxl: SDXL 1.0 base)")
    chk.add_argument("--json", action="store_true", help="print the matched modules per component as JSON")
    chk.set_defaults(func=cmd_adapters_check)
    exp = asub.add_parser("export", help="write a version as a diffusers (peft) or kohya (A1111/ComfyUI) file")
    exp.add_argument("ref", help="adapter reference: name, name@3, name@alias or sha256:<prefix>")
    exp.add_argument("--format", dest="fmt", choices=("diffusers", "kohya"), required=True,
                     help="diffusers: peft keys + lora_adapter_metadata; kohya: lora_unet_*/lora_te_* + .alpha")
    exp.add_argument("--out", type=Path, required=True, help="the .safetensors file to write, or a folder")
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    exp.add_argument("--json", action="store_true", help="print {path, format, size_bytes}")
    exp.set_defaults(func=cmd_adapters_export)
    pub = asub.add_parser("publish", help="publish a version to a Hugging Face Hub model repo: one commit, tagged "
                                          "v<number>; HF_TOKEN or `hf auth login` credentials")
    pub.add_argument("ref", help="adapter reference: name, name@3, name@alias or sha256:<prefix>")
    pub.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the Hub model repo (created if missing)")
    pub.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                            "visibility)")
    pub.add_argument("--kohya", action="store_true", help="also upload <name>.safetensors in kohya layout for "
                                                          "AUTOMATIC1111/ComfyUI (LoRA only)")
    pub.add_argument("--dry-run", type=Path, metavar="DIR", dest="dry_run",
                     help="write exactly the files that would be uploaded into DIR (new or empty); no network")
    pub.add_argument("--base-model", metavar="OWNER/NAME",
                     help="Hub id for the card's base_model when the version's base model is not a Hub id")
    pub.add_argument("--license", help="the card's license, e.g. openrail++ (default: the version's, else unknown)")
    pub.add_argument("--json", action="store_true", help="print {repo_id, url, commit, tag, files, ...}")
    pub.set_defaults(func=cmd_adapters_publish)
    pull = asub.add_parser("pull", help="download a Hub adapter at a revision into the registry (origin 'pulled')")
    pull.add_argument("repo", metavar="OWNER/NAME[@REVISION]",
                      help="the Hub repo, optionally at a tag (v3), branch or commit; default main")
    pull.add_argument("--name", help="adapter name (default: the published name, else the repo's name)")
    pull.add_argument("--base", default=None,
                      help="base model to validate against (default: the studio's default base model, "
                           "LORA_STUDIO_BASE_MODEL, else tiny); the publication's own base model is never loaded")
    pull.add_argument("--json", action="store_true", help="print the version record")
    pull.set_defaults(func=cmd_adapters_pull)
    rm = asub.add_parser("delete", help="delete a version (name@3, name@alias, sha256:...) or a whole adapter (name)")
    rm.add_argument("ref", help="a version reference, or a bare NAME to delete the adapter with all its versions")
    rm.add_argument("--force", action="store_true", help="also when a user alias (e.g. prod) points at it")
    rm.set_defaults(func=cmd_adapters_delete)
    mg = asub.add_parser("merge", help="merge LoRAs into a new adapter (peft's weighted merge), parents as lineage")
    mg.add_argument("parents", nargs="+", metavar="REF[:WEIGHT]", help="the adapters to merge, each with a weight")
    mg.add_argument("--method", choices=METHODS, required=True,
                    help="linear (equal ranks), cat (exact; rank = sum), svd (exact sum cut to --rank), ties and "
                         "dare_linear (equal ranks; keep --density of each delta)")
    mg.add_argument("--density", type=number, default=None, help="ties / dare_linear: fraction kept, 0 < D <= 1")
    mg.add_argument("--rank", type=whole_number, default=None,
                    help="svd: rank of the result (default: the largest parent's)")
    mg.add_argument("--name", required=True, help="name of the new adapter (a new version if it exists)")
    mg.add_argument("--description", default="", help="free text for the new version")
    mg.add_argument("--json", action="store_true", help="print the new version's record")
    mg.set_defaults(func=cmd_adapters_merge)


def cmd_adapters_list(args) -> int:
    with open_registry() as reg:
        page = reg.list_versions(search=args.search, tag=args.tag, family=args.family, trigger=args.trigger,
                                 adapter_type=args.adapter_type, sort=args.sort, limit=args.limit, offset=args.offset)
    if args.json:
        print_json(page.to_dict())
        return 0
    if not page.items:
        print_line(f"no adapter versions match ({page.total} in total with these filters)")
        return 0
    print_table(("REF", "TYPE", "RANK", "FAMILY", "ALIASES", "TAGS", "TRIGGER WORDS"),
                [(v.ref, v.adapter_type, str(v.rank or "?"), v.family, ",".join(v.aliases), ",".join(v.tags),
                  ", ".join(v.trigger_words)) for v in page.items])
    print_line(f"showing {page.offset + 1}-{page.offset + len(page.items)} of {page.total}")
    return 0


def cmd_adapters_show(args) -> int:
    with open_registry() as reg:
        v = reg.get(args.ref)
        publications = reg.publications(v.ref)
    if args.json:
        print_json({**v.to_dict(), "publications": [p.to_dict() for p in publications]})
        return 0
    from adapters.formats import coverage_text

    d = v.to_dict()
    applies_to = (v.metrics or {}).get("applies_to")
    lines = [
        ("ref", v.ref), ("aliases", ", ".join(v.aliases)), ("family", v.family), ("type", v.adapter_type),
        ("rank", v.rank), ("alpha", v.alpha), ("components", ", ".join(v.components)),
        ("target modules", ", ".join(v.target_modules)),
        ("applies to", coverage_text(applies_to) if applies_to else None),
        ("trigger words", ", ".join(v.trigger_words)),
        ("tags", ", ".join(v.tags)), ("description", v.description), ("license", v.license), ("author", v.author),
        ("base model", v.base_model), ("base model sha256", v.base_model_sha256), ("origin", v.origin),
        ("parents", ", ".join(f"{p.ref}{'' if p.present else ' (deleted)'}" for p in v.parents)),
        ("created", d["created_at"]), ("sha256", v.weights_sha256), ("tensor sha256", v.tensor_sha256),
        ("AutoV2", v.autov2), ("A1111 legacy hash", v.a1111_legacy), ("size", f"{v.size_bytes} bytes"),
        ("file", str(v.path)), ("samples", len(v.samples)), ("metadata keys", len(v.safetensors_metadata)),
    ]
    print_fields([(key + ":", value) for key, value in lines if value not in (None, "", ())], width=19)
    print_fields([("published:", f"{p.repo_id}@{p.tag} (commit {p.commit[:12]}, {p.published_at:%Y-%m-%d}) {p.url}")
                  for p in publications], width=19)
    return 0


def _is_catalog(path: Path) -> bool:
    """A folder of adapter files, not the one folder ``save_lora_weights`` writes."""
    return path.is_dir() and not (path / DIFFUSERS_WEIGHT_NAME).is_file() and len(list(path.glob("*.safetensors"))) != 1


def cmd_adapters_import(args) -> int:
    quiet_libraries()
    # Local: adapters.ingest opens the registry (SQLAlchemy), kept off the fast path like open_registry.
    from adapters.ingest import import_adapter, import_folder

    if _is_catalog(args.path):
        if args.name or args.triggers or args.tags or args.description:
            raise InvalidRequestError("--name, --trigger, --tag and --description describe one adapter: import a "
                                      "folder without them (each file keeps its own metadata)")
        with open_registry() as reg:
            rows = import_folder(reg, args.path, base=args.base)
        counts = {s: sum(r.status == s for r in rows) for s in ("imported", "existing", "duplicate", "refused")}
        if args.json:
            print_json({"files": [r.to_dict() for r in rows], "counts": counts})
        else:
            for r in rows:
                detail = r.ref or ""
                if r.reason:
                    detail = f"{detail}: {r.reason}" if detail and r.status != "duplicate" else r.reason
                print_line(f"{r.status:<9} {r.path.relative_to(args.path)}  {detail}".rstrip())
            print_line(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(rows)} file(s))")
        return 1 if rows and counts["refused"] == len(rows) else 0

    info = detect(args.path)  # header only: its warnings and suggestions are shown with the result
    started = datetime.now(UTC)
    with open_registry() as reg:
        v = import_adapter(reg, args.path, name=args.name, base=args.base, trigger_words=args.triggers,
                           tags=args.tags, description=args.description)
    existed = v.created_at < started
    suggested = info.trigger_words if info.trigger_words_suggested and not v.trigger_words else []
    if args.json:
        print_json({**v.to_dict(), "import": {
            "format": info.format, "key_style": info.key_style, "alpha_source": info.alpha_source,
            "architecture": info.architecture, "already_registered": existed, "warnings": info.warnings,
            "suggested_trigger_words": suggested}})
        return 0
    what = (f"{info.format} {METHOD_NAMES[v.adapter_type]}, rank {v.rank}, alpha {v.alpha:g} ({info.alpha_source}), "
            f"{' + '.join(v.components)}")
    print_line(f"{'already registered as' if existed else 'imported'} {v.ref} ({what})")
    if v.trigger_words:
        print_line(f"trigger words: {', '.join(v.trigger_words)}")
    for warning in info.warnings:
        if not (info.trigger_words_suggested and "suggested" in warning):
            print_warning(warning, err=False)  # part of the import report, on stdout with it
    if suggested:
        print_line(f"suggested trigger words (from the training tags): {', '.join(suggested)}; "
                   f"record them with --trigger")
    return 0


def cmd_adapters_check(args) -> int:
    quiet_libraries()
    info = detect(args.path)
    report = check_against_reference(args.path, args.family)
    per_component = {c: sum(1 for (comp, _) in report.resolved if comp == c) for c in report.components}
    if args.json:
        print_json({"path": str(args.path), "family": args.family, "format": info.format,
                    "adapter_type": info.adapter_type, "modules": report.num_modules, "components": per_component})
        return 0
    where = ", ".join(f"{n} in {c}" for c, n in per_component.items())
    print_line(f"fits the full-size {get_family(args.family).display_name}: all {report.num_modules} modules "
               f"({where}) exist with these shapes")
    return 0


def cmd_adapters_export(args) -> int:
    quiet_libraries()
    # Local: adapters.ingest opens the registry (SQLAlchemy), kept off the fast path like open_registry.
    from adapters.ingest import export_adapter

    with open_registry() as reg:
        path = export_adapter(reg, args.ref, format=args.fmt, out=args.out, force=args.force)
    print_result(args.json, {"path": str(path), "format": args.fmt, "size_bytes": path.stat().st_size}, path)
    return 0


def cmd_adapters_publish(args) -> int:
    quiet_libraries()
    # Local: studio.app.hub loads huggingface_hub and the registry (~0.3 s), needed by publish and pull only.
    from studio.app.hub import publish_version

    with open_registry() as reg:
        result = publish_version(reg, args.ref, args.repo, private=args.private, kohya=args.kohya,
                                 dry_run_dir=args.dry_run, base_model=args.base_model, license=args.license)
    if args.json:
        print_json(result.to_dict())
        return 0
    for warning in result.warnings:
        print_warning(warning)
    if result.dry_run:
        print_line(f"wrote {len(result.files)} files to {result.out_dir} (nothing uploaded):")
        for f in result.files:
            print_line(f"  {f}")
        return 0
    what = "already published as" if result.already_published else "published"
    print_line(f"{what} {result.ref} -> {result.repo_id}@{result.tag} (commit {result.commit[:12]})")
    print_line(result.tag_url)
    return 0


def cmd_adapters_pull(args) -> int:
    quiet_libraries()
    # Local: studio.app.hub loads huggingface_hub and the registry (~0.3 s), needed by publish and pull only.
    from studio.app.hub import pull_adapter

    started = datetime.now(UTC)
    with open_registry() as reg:
        v = pull_adapter(reg, args.repo, name=args.name, base=args.base)
    for refused in (v.source or {}).get("refused_samples") or ():
        print_warning(f"sample {refused.get('file')} was not stored: {refused.get('reason')}")
    if args.json:
        print_json(v.to_dict())
        return 0
    hub = (v.source or {}).get("hub") or {}
    what = "already registered as" if v.created_at < started else "pulled"
    print_line(f"{what} {v.ref} from {hub.get('repo_id', args.repo)}@{hub.get('revision', '?')} "
               f"(commit {str(hub.get('commit', '?'))[:12]})")
    if v.trigger_words:
        print_line(f"trigger words: {', '.join(v.trigger_words)}")
    return 0


def cmd_adapters_tag(args) -> int:
    with open_registry() as reg:
        v = reg.set_alias(args.ref, args.alias, protect=args.protect, force=args.force)
        protected = args.alias in reg.adapter(v.name).protected
    print_line(f"{v.name}@{args.alias} -> {v.ref}{' (protected)' if protected else ''}")
    return 0


def cmd_adapters_untag(args) -> int:
    with open_registry() as reg:
        was = reg.remove_alias(args.name, args.alias, force=args.force)
    print_line(f"removed {args.name}@{args.alias} (was {args.name}@{was})")
    return 0


def cmd_adapters_label(args) -> int:
    if not args.add and not args.remove:
        raise InvalidRequestError("say what to change: --add LABEL and/or --remove LABEL")
    with open_registry() as reg:
        v = reg.set_labels(args.ref, add=args.add, remove=args.remove)
    print_line(f"{v.ref} labels: {', '.join(v.tags) or 'none'}")
    return 0


def cmd_adapters_history(args) -> int:
    with open_registry() as reg:
        limit = args.limit if args.limit is not None or args.name else CATALOG_EVENTS
        events = reg.history(args.name, limit=limit, actor=args.actor, action=args.action)
    if args.json:
        print_json([e.to_dict() for e in events])
        return 0
    print_table(["when (UTC)", "who", "what"],
                [(f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.summary) for e in events])
    return 0


def cmd_adapters_merge(args) -> int:
    quiet_libraries()
    parents = [parse_merge_arg(text) for text in args.parents]
    with open_registry() as reg:
        v = merge_adapters(reg, parents, method=args.method, name=args.name, density=args.density, rank=args.rank,
                           description=args.description)
    if args.json:
        print_json(v.to_dict())
    else:
        print_line(f"merged {', '.join(v.source['merge']['parents'])} ({args.method}) into {v.ref}, rank {v.rank}")
    return 0


def cmd_adapters_delete(args) -> int:
    with open_registry() as reg:
        report = reg.delete(args.ref, force=args.force)
    print_line(f"deleted {', '.join(report.deleted)}")
    if report.aliases_removed:
        print_line(f"removed aliases {', '.join(report.aliases_removed)}")
    print_line(f"freed {len(report.blobs_removed)} blob(s), {report.bytes_freed} bytes")
    return 0
