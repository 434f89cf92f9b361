"""``lora-studio datasets check DIR``: what the trainer would read from a folder, before training on it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from studio.app.cli.common import Parser, whole_number
from studio.app.cli.output import print_fields, print_json, print_line
from studio.core.settings import get_settings
from trainer.config import ModelConfig, TrainConfig


def register(sub) -> None:
    """Add ``datasets`` and its subcommands to the ``lora-studio`` subcommands."""
    p = sub.add_parser("datasets", help="training datasets: check a folder before training on it")
    dsub = p.add_subparsers(dest="datasets_command", required=True, parser_class=Parser)
    check = dsub.add_parser(
        "check", help="layout, counts, captions, tags, buckets, duplicates and every skipped file with its reason "
                      "(exit status 1 when no image is usable)")
    check.add_argument("dir", type=Path, help="the dataset folder (any layout the trainer reads)")
    check.add_argument("--resolution", type=whole_number, default=None,
                       help="training side in pixels for the buckets (default: the config's, else the base model's "
                            "native resolution; tiny: 32)")
    check.add_argument("--bucket-step", type=whole_number, default=None,
                       help="bucket sides are multiples of this (default: the base model's latent granularity, 8)")
    check.add_argument("--config", type=Path, default=None,
                       help="take the [dataset] options (trigger word, captions, buckets) from this training TOML")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.set_defaults(func=cmd_datasets_check)


def cmd_datasets_check(args) -> int:
    # Local: trainer.data loads PIL and numpy (~0.15 s), which --help and the other groups never need.
    from trainer.data import check_dataset

    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig(
        model=ModelConfig(base_model=get_settings().default_base_model))
    d = config.dataset
    config.dataset = replace(d, path=str(args.dir), resolution=args.resolution or d.resolution,
                             bucket_reso_steps=args.bucket_step or d.bucket_reso_steps)
    dataset = config.resolved().dataset
    report = check_dataset(args.dir, config=dataset)
    if args.json:
        print_json(report.to_dict())
    else:
        _print_dataset_report(report)
    return 0 if report.usable_count else 1


def _print_dataset_report(report) -> None:
    rows = [
        ("dataset", report.path),
        ("layout", f"{report.layout} ({report.layout_description})"),
        ("images", f"{report.image_count} found, {report.usable_count} usable, {len(report.bad_files)} skipped; "
                   f"{report.samples_per_epoch} samples per epoch"),
    ]
    if report.layout == "kohya" or any(n != 1 for n in report.repeats.values()):
        rows.append(("repeats", ", ".join(f"{folder} x{n}" for folder, n in report.repeats.items())))
    sources = ", ".join(f"{k} {v}" for k, v in report.caption_sources.items())
    rows.append(("captions", f"{report.captioned_count}/{report.usable_count} ({report.caption_coverage:.0%})"
                             + (f": {sources}" if sources else "")))
    rows.append(("buckets", (", ".join(f"{b}: {n}" for b, n in report.buckets.items()) or "none")
                 + f"  (resolution {report.resolution}, step {report.bucket_step})"))
    for folder, tags in report.tag_frequency.items():
        top = list(tags.items())[:8]
        more = f", ... ({len(tags)} tags)" if len(tags) > len(top) else ""
        rows.append(("tags", f"{folder}: " + ", ".join(f"{t} {n}" for t, n in top) + more))
    rows.append(("duplicates", "; ".join(" = ".join(group) for group in report.duplicates) or "none"))
    rows.append(("fingerprint", report.fingerprint))
    print_fields(rows, width=12)
    for title, items in (("skipped", report.bad_files), ("ignored", report.ignored_files)):
        if items:
            print_line(f"{title} ({len(items)}):")
            for item in items:
                print_line(f"  {item.path}: {item.reason}")
    for note in report.notes:
        print_line(f"note: {note}")
