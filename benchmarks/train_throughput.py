"""Training step time: the studio trainer vs a plain reference loop, same model, data, batch and steps.

The reference is written the way diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
works: every step runs the VAE encoder on the batch's pixels and the text encoder on its captions,
then the UNet forward/backward and an AdamW step on the LoRA parameters. The studio trainer
(``trainer.loop.train``) caches VAE posteriors and text embeddings (``trainer/caches.py``); it is
measured twice, with an empty cache (first run on a dataset) and with the cache its first run
filled (every later run on the same data and base model).

Each configuration runs in its own fresh process (so peak memory is its own: ru_maxrss, or the CUDA
allocator's peak on a GPU), one after another, repeated ``--rounds`` times in alternation; the
median steady-state step time is taken after ``--warmup`` steps. Run from the repository root:

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [--steps 60] [--rounds 2]

Goal (issue 3): studio / reference step-time ratio <= 0.70.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASET_TOML = ROOT / "datasets" / "striped" / "train.toml"


def _config(steps: int, out_dir: str):
    from trainer.config import TrainConfig

    return TrainConfig.from_toml(DATASET_TOML).apply_overrides([
        f"training.max_train_steps={steps}", "training.lr_warmup_steps=0", "validation.every_n_steps=0",
        "validation.prompts=[]", "validation.held_out_count=0", "output.checkpointing_steps=0",
        f"output.dir={out_dir}", "output.name=bench"]).resolved()


def _peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_reference(steps: int, out_dir: str) -> list[float]:
    """diffusers-script style: VAE + text encoder on every step, no caches."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from studio.core.base_models import load_fresh_pipeline
    from studio.core.families import get_family
    from trainer.data import open_training_dataset
    from trainer.methods import target_modules

    cfg = _config(steps, out_dir)
    torch.manual_seed(cfg.training.seed)
    data = open_training_dataset(cfg.dataset, seed=cfg.training.seed)
    pipe = load_fresh_pipeline(cfg.model.base_model)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    # the same layers as the studio run (the shipped config's preset), so only the loop differs
    targets = target_modules(cfg.network, get_family("sd1"), "unet")
    unet.add_adapter(LoraConfig(r=cfg.network.rank, lora_alpha=cfg.network.lora_alpha, init_lora_weights="gaussian",
                                target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.training.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler(cfg.training.lr_scheduler, optimizer=opt, num_warmup_steps=0,
                                 num_training_steps=steps)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    times = []
    step, epoch = 0, 0
    unet.train()
    while step < steps:
        data.set_epoch(epoch)
        for batch_ids in data.bucket_batches(cfg.training.train_batch_size, epoch=epoch):
            if step >= steps:
                break
            t0 = time.perf_counter()
            samples = [data[i] for i in batch_ids]
            pixels = torch.stack([s["pixel_values"] for s in samples])
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy = sched.add_noise(latents, noise, t)
            ids = tok([s["caption"] for s in samples], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            hidden = te(ids, return_dict=False)[0]
            pred = unet(noisy, t, hidden, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.training.max_grad_norm)
            opt.step()
            lr_scheduler.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
            step += 1
        epoch += 1
    return times


def run_studio(steps: int, out_dir: str) -> list[float]:
    from trainer.events import read_events
    from trainer.loop import train

    result = train(_config(steps, out_dir), register=False, console=False)
    stamps = [e["time"] for e in read_events(result.run_dir) if e["event"] in ("start", "step")]
    # "time" of a step event is when it finished; differences between them are step times (the
    # first difference is from "start", which is written after the model is loaded).
    return [b - a for a, b in zip(stamps, stamps[1:])]


def child(kind: str, steps: int, out_dir: str) -> dict:
    fn = {"reference": run_reference, "studio": run_studio}[kind]
    times = fn(steps, out_dir)
    return {"kind": kind, "times": times, "peak_mb": _peak_memory_mb()}


def _launch(kind: str, steps: int, home: str, out_dir: str) -> dict:
    env = {**os.environ, "LORA_STUDIO_HOME": home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(steps), "--out-dir", out_dir],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median (first-call overheads)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=["reference", "studio"], help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.out_dir)))
        return 0
    results: dict[str, list[dict]] = {"reference": [], "studio, cold cache": [], "studio, warm cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            home = str(Path(tmp) / f"home{r}")  # an empty cache each round: the first studio run fills it
            out = str(Path(tmp) / f"runs{r}")
            results["reference"].append(_launch("reference", args.steps, home, out))
            results["studio, cold cache"].append(_launch("studio", args.steps, home, out))
            results["studio, warm cache"].append(_launch("studio", args.steps, home, out))
    print(f"train throughput: tiny model, datasets/striped, batch 4 at 32 px, {args.steps} steps, "
          f"{args.rounds} rounds, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'configuration':<22} {'median s/step':>14} {'ratio':>7} {'peak MB':>9}")
    medians = {}
    for label, runs in results.items():
        steady = [t for run in runs for t in run["times"][args.warmup:]]
        medians[label] = statistics.median(steady)
        peak = max(run["peak_mb"] for run in runs)
        print(f"{label:<22} {medians[label]:>14.4f} {medians[label] / medians['reference']:>7.2f} {peak:>9.0f}")
    print(f"goal: studio / reference <= 0.70 -> warm cache {medians['studio, warm cache'] / medians['reference']:.2f}, "
          f"cold cache {medians['studio, cold cache'] / medians['reference']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
