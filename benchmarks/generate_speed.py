"""Generation speed of the tiny model: the studio's path vs diffusers' batched default, side by side.

The studio denoises one image at a time so that every image is bit-identical to its recipe re-run
alone. This measures what that costs against one batched pipeline call (num_images_per_prompt=N,
a list of per-image generators), and whether the batched images would have matched.

    .venv/bin/python benchmarks/generate_speed.py [--images 4] [--steps 20] [--sizes 32 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from studio.core.base_models import load_pipeline
from studio.generation.requests import GenerationRequest, make_scheduler
from studio.generation.run import generate_with_pipeline

PROMPT = "a red circle on a blue background"


def batched(pipe, n: int, steps: int, size: int, seed: int):
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=2.0, width=size, height=size,
                generator=gens, num_images_per_prompt=n).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = load_pipeline("tiny")
    print(f"torch threads: {torch.get_num_threads()}, images per run: {args.images}, steps: {args.steps}")
    for size in args.sizes:
        request = GenerationRequest(prompt=PROMPT, seed=1, num_images=args.images, num_inference_steps=args.steps,
                                    width=size, height=size)
        generate_with_pipeline(pipe, request)  # warm-up
        studio_t, batch_t = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours = generate_with_pipeline(pipe, request).images
            studio_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = batched(pipe, args.images, args.steps, size, seed=1)
            batch_t.append(time.perf_counter() - t0)
        same = sum(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))
        s, b = statistics.median(studio_t) / args.images, statistics.median(batch_t) / args.images
        print(f"{size:>4} px: studio one-at-a-time {s * 1000:7.1f} ms/image | batched {b * 1000:7.1f} ms/image | "
              f"ratio studio/batched {s / b:.2f} | batched images bit-identical to studio's: {same}/{args.images}")


if __name__ == "__main__":
    main()
