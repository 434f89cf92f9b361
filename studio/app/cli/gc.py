"""``lora-studio gc``: free disk space the studio no longer needs (studio.app.cleanup)."""

from __future__ import annotations

from studio.app.cleanup import CATEGORIES, DEFAULT_CATEGORIES, DEFAULT_OLDER_THAN_DAYS, collect, human_bytes
from studio.app.cli.common import number
from studio.app.cli.output import print_json, print_line


def register(sub) -> None:
    """Add ``gc`` to the ``lora-studio`` subcommands."""
    p = sub.add_parser("gc", help="free disk space: orphan blobs, stale caches, checkpoints of finished runs, "
                                  "inputs no recipe pins, and (when named) old outputs")
    p.add_argument("--dry-run", action="store_true", help="only report what would be freed (count and bytes)")
    p.add_argument("--category", dest="categories", action="append", choices=CATEGORIES, default=None,
                   help=f"clean only this category (repeatable; default: {', '.join(DEFAULT_CATEGORIES)}; "
                        f"outputs, your generated images, only when named)")
    p.add_argument("--older-than", type=number, default=DEFAULT_OLDER_THAN_DAYS, metavar="DAYS",
                   help=f"leave caches, checkpoints, inputs and outputs younger than this many days "
                        f"(default {DEFAULT_OLDER_THAN_DAYS:g}; 0: any age)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_gc)


def _items(count: int) -> str:
    return "item" if count == 1 else "items"


def cmd_gc(args) -> int:
    report = collect(categories=tuple(args.categories or DEFAULT_CATEGORIES), older_than_days=args.older_than,
                     dry_run=args.dry_run)
    if args.json:
        print_json(report.to_dict())
        return 0
    verb = "would free" if report.dry_run else "freed"
    for name, part in report.categories.items():
        print_line(f"{name:<12} {part.count:>6} {_items(part.count)}  {human_bytes(part.bytes)}")
    print_line(f"{'total':<12} {report.count:>6} {_items(report.count)}  {human_bytes(report.bytes)}"
               f" ({verb}; older than {report.older_than_days:g} days where age counts)")
    for line in report.kept:
        print_line(f"kept: {line}")
    return 0
