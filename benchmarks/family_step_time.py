"""Training step time per family: the studio trainer on ``tiny`` (SD-1), ``tiny-sdxl`` (SDXL),
``tiny-flux`` (FLUX.1) and ``tiny-sd3`` (SD3.5), same dataset, batch, resolution, rank and steps.

What differs is the family: SDXL's UNet also reads the pooled text embedding and the six size
numbers (``time_ids``) through its ``text_time`` embedding, its conditioning comes from two text
encoders, and each batch builds its per-image size conditioning; Flux is a flow-matching transformer
over packed latents, trained on every linear layer of its blocks (it has no convolutions for LoCon);
SD3 is a flow-matching MMDiT over patched latents, trained the same way.
All run with warm caches (latents and conditioning cached by a first run), so the numbers compare
the denoiser steps. Each
configuration runs in its own fresh process, alternating, ``--rounds`` times; the median step time
after ``--warmup`` steps is reported, with the ratio to SD-1. Run from the repository root:

    OMP_NUM_THREADS=2 python benchmarks/family_step_time.py [--steps 40] [--rounds 2] [--models tiny tiny-sd3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASET_TOML = ROOT / "datasets" / "striped" / "train.toml"
MODELS = ("tiny", "tiny-sdxl", "tiny-flux", "tiny-sd3")
# The shipped config's LoCon preset, or the nearest a transformer has.
TARGETS = {"tiny-flux": "all-linear", "tiny-sd3": "all-linear"}


def run(base: str, steps: int, out_dir: str) -> dict:
    import resource

    from trainer.config import TrainConfig
    from trainer.events import read_events
    from trainer.loop import train

    config = TrainConfig.from_toml(DATASET_TOML).apply_overrides([
        f"model.base_model={base}", f"training.max_train_steps={steps}", "training.lr_warmup_steps=0",
        "validation.every_n_steps=0", "validation.prompts=[]", "validation.held_out_count=0",
        "output.checkpointing_steps=0", f"output.dir={out_dir}", "output.name=bench",
        *([f"network.target_modules={TARGETS[base]}"] if base in TARGETS else [])]).resolved()
    result = train(config, register=False, console=False)
    stamps = [e["time"] for e in read_events(result.run_dir) if e["event"] in ("start", "step")]
    return {"times": [b - a for a, b in zip(stamps, stamps[1:])],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _launch(base: str, steps: int, home: str, out_dir: str) -> dict:
    env = {**os.environ, "LORA_STUDIO_HOME": home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--child", base, "--steps", str(steps), "--out-dir", out_dir],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{base} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (first-call overheads)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="the embedded models to time (tiny, the ratios' reference, is always included)")
    p.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run(args.child, args.steps, args.out_dir)))
        return 0
    models = ["tiny", *(m for m in args.models if m != "tiny")]
    results: dict[str, list[dict]] = {m: [] for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        home = str(Path(tmp) / "home")
        for base in models:  # fill the latent and conditioning caches once, untimed
            _launch(base, 2, home, str(Path(tmp) / "warm"))
        for r in range(args.rounds):
            for base in models:
                results[base].append(_launch(base, args.steps, home, str(Path(tmp) / f"runs{r}")))
    print(f"training step time per family: datasets/striped, batch 4 at 32 px, rank 8 (LoCon; all-linear on Flux "
          f"and SD3), {args.steps} steps, "
          f"{args.rounds} rounds, warm caches, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'base model':<12} {'median s/step':>14} {'ratio':>7} {'peak MB':>9}")
    medians = {}
    for base, runs in results.items():
        medians[base] = statistics.median(t for run in runs for t in run["times"][args.warmup:])
        peak = max(run["peak_mb"] for run in runs)
        print(f"{base:<12} {medians[base]:>14.4f} {medians[base] / medians['tiny']:>7.2f} {peak:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
