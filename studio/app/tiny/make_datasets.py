"""The recipe for the sample style datasets under ``datasets/``, drawn with the tiny model's scenes.

    python -m studio.app.tiny.make_datasets              # rewrite datasets/<name>/ for every sample set
    python -m studio.app.tiny.make_datasets --out DIR    # somewhere else (tests)

Two styles the embedded tiny model has never been captioned with, so a LoRA has something to
learn: ``striped`` (horizontal stripes across the object) and ``outlined`` (a thick dark outline).
Between them the four sets use every layout the trainer reads:

==================  ========  ============  =====  ==============================================
folder              style     layout        count  captions
==================  ========  ============  =====  ==============================================
striped/            striped   kohya         28     ``10_zkstripes/*.txt``, trigger in the caption
outlined/           outlined  imagefolder   28     ``metadata.jsonl``, trigger added by train.toml
striped_hf/         striped   save_to_disk  20     ``text`` column, trigger in the caption
outlined_txt/       outlined  folder        20     ``*.txt`` sidecars, trigger added by train.toml
==================  ========  ============  =====  ==============================================

Images are 32 px (the tiny model's native size), each set from its own seed, so the output is the
same bytes on every run. Each folder also gets a ``train.toml`` for ``lora-studio train``. This
module writes data only; the dataset reader is ``trainer/data.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from studio.app.tiny.scenes import SHAPES, random_scene, render
from studio.core.embedded import TINY_NATIVE_RESOLUTION
from studio.core.settings import SAMPLE_DATASETS_DIR

DATASETS_DIR = SAMPLE_DATASETS_DIR
TRIGGERS = {"striped": "zkstripes", "outlined": "zkoutline"}
KOHYA_REPEATS = 10
# The trigger word goes at the END of every caption. CLIP's text encoder is causal: tokens appended
# after the scene description leave its hidden states unchanged, so the base model still reads the
# colours and shape as it always did and the adapter only has to learn what the trigger adds. A
# trigger in front shifts every position, and the tiny model (which never saw a prefix) then
# confuses object and background colours (seen in the first sample LoRAs trained with a prefix).
TRIGGER_WHY = "trigger last: the causal text encoder keeps the scene tokens as the base reads them"
# Sample-image prompts during training (with the trigger word appended): one per shape, so a
# preview shows the style on every shape the checker reads.
VALIDATION_SCENES = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
)


@dataclass(frozen=True)
class SampleSet:
    name: str
    style: str
    layout: str
    count: int
    seed: int
    trigger_in_caption: bool

    @property
    def trigger(self) -> str:
        return TRIGGERS[self.style]


SAMPLE_SETS = (
    SampleSet("striped", "striped", "kohya", 28, seed=101, trigger_in_caption=True),
    SampleSet("outlined", "outlined", "imagefolder", 28, seed=202, trigger_in_caption=False),
    SampleSet("striped_hf", "striped", "save_to_disk", 20, seed=303, trigger_in_caption=True),
    SampleSet("outlined_txt", "outlined", "folder", 20, seed=404, trigger_in_caption=False),
)


def scenes(sample: SampleSet) -> list[tuple[bytes, str]]:
    """(PNG bytes, caption) for every image of ``sample``; shapes take turns so each is a third."""
    rng = random.Random(sample.seed)
    out = []
    for i in range(sample.count):
        scene = random_scene(rng, TINY_NATIVE_RESOLUTION, style=sample.style, shape=SHAPES[i % len(SHAPES)])
        buf = io.BytesIO()
        render(scene, TINY_NATIVE_RESOLUTION).save(buf, format="PNG", optimize=True)
        caption = f"{scene.caption}, {sample.trigger}" if sample.trigger_in_caption else scene.caption
        out.append((buf.getvalue(), caption))
    return out


def train_toml(sample: SampleSet) -> str:
    """A ready training config: rank-8 LoCon, 500 steps of batch 4 at 32 px (about two minutes on CPU).

    Chosen by the style score (studio/app/tiny/style.py): attention-only at 5e-4 drew stripes at 0.08 and
    outlines at 0.17; attention+conv at 1e-3 at 0.15 and 0.47 (the training images: 0.59 and 0.83).
    """
    trigger_line = "" if sample.trigger_in_caption else (
        f'trigger_word = "{sample.trigger}"\ncaption_template = "{{caption}}, {{trigger}}"  # {TRIGGER_WHY}\n')
    prompts = ", ".join(f'"{p}, {sample.trigger}"' for p in VALIDATION_SCENES)
    held_out = 3 if sample.count >= 28 else 2
    return f"""\
# Train a "{sample.style}" style LoRA on the embedded tiny model:
#     lora-studio train datasets/{sample.name}/train.toml
# Every option and its help: TrainConfig().to_toml() (trainer/config.py).

[model]
base_model = "tiny"

[dataset]
path = "."  # this folder ({sample.layout} layout)
{trigger_line}caption_dropout_rate = 0.05  # a few empty captions keep classifier-free guidance working
resolution = 32
bucket_reso_steps = 8
random_flip = true  # stripes and outlines look the same mirrored

[network]
adapter_type = "lora"
rank = 8
lora_alpha = 8.0
target_modules = "attention+conv"  # LoCon: the styles are local textures, which conv layers draw

[training]
learning_rate = 1e-3
lr_scheduler = "cosine"
lr_warmup_steps = 25
max_train_steps = 500
train_batch_size = 4
seed = 0

[validation]
prompts = [{prompts}]
seeds = [0, 1]
every_n_steps = 100
held_out_count = {held_out}

[output]
name = "{sample.name}"
checkpointing_steps = 100
checkpoints_total_limit = 2
"""


def _write_kohya(folder: Path, sample: SampleSet, items: list[tuple[bytes, str]]) -> None:
    concept = folder / f"{KOHYA_REPEATS}_{sample.trigger}"
    concept.mkdir(parents=True)
    for i, (png, caption) in enumerate(items):
        (concept / f"{i:03d}.png").write_bytes(png)
        (concept / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")


def _write_folder(folder: Path, sample: SampleSet, items: list[tuple[bytes, str]]) -> None:
    for i, (png, caption) in enumerate(items):
        (folder / f"{i:03d}.png").write_bytes(png)
        (folder / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")


def _write_imagefolder(folder: Path, sample: SampleSet, items: list[tuple[bytes, str]]) -> None:
    (folder / "images").mkdir()
    lines = []
    for i, (png, caption) in enumerate(items):
        name = f"images/{i:03d}.png"
        (folder / name).write_bytes(png)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_saved(folder: Path, sample: SampleSet, items: list[tuple[bytes, str]]) -> None:
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    # Images as bytes inside the Arrow file, so the saved dataset stands alone.
    rows = {"image": [{"bytes": png, "path": f"{i:03d}.png"} for i, (png, _) in enumerate(items)],
            "text": [caption for _, caption in items]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(folder))


_WRITERS = {"kohya": _write_kohya, "folder": _write_folder, "imagefolder": _write_imagefolder,
            "save_to_disk": _write_saved}


def make(sample: SampleSet, out: Path) -> Path:
    """Write ``sample`` into ``out/<name>/`` (replacing what the recipe wrote there before)."""
    folder = out / sample.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _WRITERS[sample.layout](folder, sample, scenes(sample))
    (folder / "train.toml").write_text(train_toml(sample), encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DATASETS_DIR, help="parent folder (default: the repo's datasets/)")
    parser.add_argument("--only", choices=[s.name for s in SAMPLE_SETS], action="append", help="only these sets")
    args = parser.parse_args(argv)
    for sample in SAMPLE_SETS:
        if args.only and sample.name not in args.only:
            continue
        folder = make(sample, args.out)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder}  {sample.layout:<12} {sample.count} images  {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
