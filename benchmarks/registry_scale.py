"""Catalog scale: a filtered, sorted page from the registry vs loading every record, side by side.

A1111 with 6,300 LoRAs took about 6 minutes to build its UI, because it reads every file's metadata
on every start. This fills a temporary registry with 10,000 versions (2,000 adapters x 5 versions,
kohya-sized metadata on each), then times the same queries three ways in one run:

- registry: ``Registry.list_versions(...)`` - indexed SQL, one page of 20 plus the total count;
- folder scan: one JSON record per version in a folder, every file read and parsed, filtered,
  sorted and paged in Python (what a catalog without an index does on every listing);
- load all: every record loaded through the registry (``limit=None``), filtered in Python.

Setup writes the rows with a bulk insert for speed (no weights files: the blob rows carry made-up
hashes); every timed query goes through the public API. The target is < 100 ms per registry page.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/registry_scale.py [--versions 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from adapters import registry as R
from adapters.registry import Registry

TAGS = ["anime", "style", "character", "concept", "clothing", "lighting", "photoreal", "pixel-art", "watercolor",
        "landscape", "portrait", "fantasy", "sci-fi", "horror", "cute", "architecture", "food", "animal",
        "vehicle", "pose"] + [f"misc-{i}" for i in range(30)]
WORDS = ("soft light cinematic sharp painterly retro neon pastel gritty dreamy detailed minimal vivid moody "
         "bold grainy glossy matte ornate sketchy").split()
FAMILIES = ["sd1"] * 6 + ["sdxl"] * 3 + ["flux"]
TYPES = ["lora"] * 6 + ["dora", "loha", "lokr", "lora"]
QUERIES = {
    "tag=anime, newest first": dict(tag="anime", sort="newest"),
    "family=sdxl type=lora, by name, page 3": dict(family="sdxl", adapter_type="lora", sort="name", offset=40),
    "text 'cinematic moody', by name": dict(search="cinematic moody", sort="name"),
    "trigger word, newest first": dict(trigger="tok0123", sort="newest"),
    "no filter, by name, offset 5000": dict(sort="name", offset=5000),
}
PAGE = 20


def fill(reg: Registry, n_versions: int, per_adapter: int = 5, seed: int = 0) -> None:
    """Bulk-insert ``n_versions`` versions (setup only: the timed queries use the public API)."""
    rng = random.Random(seed)
    t0 = datetime(2024, 1, 1)
    n_adapters = n_versions // per_adapter
    adapter_rows, version_rows, blob_rows, tag_rows, trig_rows, alias_rows = [], [], [], [], [], []
    vid = 0
    for a in range(1, n_adapters + 1):
        name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{a:05d}"
        adapter_rows.append(dict(id=a, name=name, last_number=per_adapter, created_at=t0))
        family, trigger = rng.choice(FAMILIES), f"tok{a:04d}"
        for number in range(1, per_adapter + 1):
            vid += 1
            sha = hashlib.sha256(f"v{vid}".encode()).hexdigest()
            description = " ".join(rng.choice(WORDS) for _ in range(12))
            rank = rng.choice([4, 8, 16, 32])
            # Kohya-sized metadata: ss_tag_frequency alone is often kilobytes.
            meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank // 2), "ss_base_model_version": "sd_v1",
                    "ss_tag_frequency": json.dumps({"10_concept": {w: rng.randint(1, 50) for w in WORDS}}),
                    "ss_dataset_dirs": json.dumps({"10_concept": {"n_repeats": 10, "img_count": 40}})}
            blob_rows.append(dict(sha256=sha, size_bytes=rank * 600_000, created_at=t0))
            version_rows.append(dict(
                id=vid, adapter_id=a, number=number, weights_sha256=sha, tensor_sha256=sha[::-1], autov2=sha[:10],
                a1111_legacy=sha[10:18], size_bytes=rank * 600_000, family=family, base_model="tiny",
                base_model_sha256=None, adapter_type=rng.choice(TYPES), rank=rank, alpha=rank / 2,
                target_modules=["to_q", "to_k", "to_v", "to_out.0"], components=["unet", "text_encoder"],
                description=description, license="openrail++", author="bench", training_config={"rank": rank},
                dataset_fingerprint=None, origin="trained", source=None, metrics={"val_loss": rng.random()},
                weights_format="kohya", safetensors_metadata=meta, search_text=f"{name}\n{description}".lower(),
                created_at=t0 + timedelta(seconds=vid)))
            for i, tag in enumerate(rng.sample(TAGS, rng.randint(1, 4))):
                tag_rows.append(dict(version_id=vid, position=i, tag=tag, tag_key=tag))
            trig_rows.append(dict(version_id=vid, position=0, word=trigger, word_key=trigger))
        alias_rows.append(dict(adapter_id=a, alias=R.LATEST, version_id=vid))
        if a % 3 == 0:
            alias_rows.append(dict(adapter_id=a, alias="prod", version_id=vid - 1))
    with reg._engine.begin() as conn:
        for table, rows in ((R.adapters, adapter_rows), (R.blobs, blob_rows), (R.versions, version_rows),
                            (R.version_tags, tag_rows), (R.version_triggers, trig_rows), (R.aliases, alias_rows)):
            conn.execute(table.insert(), rows)


def naive_filter(records: list[dict], *, search=None, tag=None, family=None, trigger=None, adapter_type=None,
                 sort="name", offset=0) -> tuple[list[str], int]:
    """The same filters, sort and page, in Python over every record."""
    words = (search or "").lower().split()
    hits = [r for r in records
            if (not tag or tag.lower() in (t.lower() for t in r["tags"]))
            and (not family or r["family"] == family)
            and (not adapter_type or r["adapter_type"] == adapter_type)
            and (not trigger or trigger.lower() in (w.lower() for w in r["trigger_words"]))
            and all(w in f"{r['name']}\n{r['description']}".lower() for w in words)]
    if sort == "name":
        hits.sort(key=lambda r: (r["name"], r["number"]))
    else:
        hits.sort(key=lambda r: r["created_at"], reverse=(sort == "newest"))
    return [r["ref"] for r in hits[offset:offset + PAGE]], len(hits)


def folder_scan(folder: Path, **query) -> tuple[list[str], int]:
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return naive_filter(records, **query)


def load_all(reg: Registry, **query) -> tuple[list[str], int]:
    records = [v.to_dict() for v in reg.list_versions(limit=None).items]
    return naive_filter(records, **query)


def via_registry(reg: Registry, **query) -> tuple[list[str], int]:
    page = reg.list_versions(limit=PAGE, **query)
    return [v.ref for v in page.items], page.total


def median_ms(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7, help="runs per registry query (median)")
    parser.add_argument("--naive-repeats", type=int, default=3, help="runs per naive query (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        reg = Registry(home=home)
        t0 = time.perf_counter()
        fill(reg, args.versions)
        folder = home / "records"
        folder.mkdir()
        for v in reg.list_versions(limit=None).items:
            (folder / f"{v.name}@{v.number}.json").write_text(json.dumps(v.to_dict()))
        print(f"setup: {args.versions} versions in SQLite + {args.versions} JSON records in a folder, "
              f"{time.perf_counter() - t0:.1f} s")
        print(f"{'query':<40} {'hits':>6} {'registry':>10} {'folder scan':>12} {'load all':>10} "
              f"{'scan/registry':>14} {'all/registry':>13}")
        worst = 0.0
        for label, query in QUERIES.items():
            via_registry(reg, **query)  # warm the connection pool and SQLite's page cache, as a running UI would be
            ms_reg, ours = median_ms(lambda q=query: via_registry(reg, **q), args.repeats)
            ms_scan, scanned = median_ms(lambda q=query: folder_scan(folder, **q), args.naive_repeats)
            ms_all, loaded = median_ms(lambda q=query: load_all(reg, **q), args.naive_repeats)
            if not (ours == scanned == loaded):
                raise SystemExit(f"results differ for {label!r}: {ours} / {scanned} / {loaded}")
            worst = max(worst, ms_reg)
            print(f"{label:<40} {ours[1]:>6} {ms_reg:>8.1f}ms {ms_scan:>10.0f}ms {ms_all:>8.0f}ms "
                  f"{ms_scan / ms_reg:>13.0f}x {ms_all / ms_reg:>12.0f}x")
        print(f"slowest registry page: {worst:.1f} ms (target < 100 ms: {'met' if worst < 100 else 'MISSED'}); "
              f"all three ways returned the same pages and totals")
        reg.close()


if __name__ == "__main__":
    main()
