"""Generation speed of the tiny model: the studio's path vs one batched diffusers call, side by side.

The studio denoises a request's images in batches and records each image's batch in its recipe, so
that any image re-runs bit for bit. This measures, in one run:

- variations: N images of one prompt through ``generate_with_pipeline`` (recipes, adapters check,
  everything a CLI or page request does) against a plain batched diffusers call
  (``num_images_per_prompt=N``, a list of per-image generators); goal: ratio <= 1.05;
- replay: re-making one image of a batch of N from its recipe (the batch is rebuilt) against the
  time the batch took per image and in all.

    .venv/bin/python benchmarks/generate_speed.py [--images 4 16] [--steps 20] [--sizes 32 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from studio.core.base_models import load_pipeline
from studio.generation.requests import GenerationRequest, make_scheduler
from studio.generation.run import generate_with_pipeline

PROMPT = "a red circle on a blue background"


def batched(pipe, n: int, steps: int, size: int, seed: int):
    """What a plain diffusers script does: one call, one prompt, N images."""
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=2.0, width=size, height=size,
                generator=gens, num_images_per_prompt=n).images


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = load_pipeline("tiny")
    print(f"torch threads: {torch.get_num_threads()}, steps: {args.steps}, median of {args.repeats} rounds; "
          f"the two ways alternate within a round")
    for size in args.sizes:
        for n in args.images:
            request = GenerationRequest(prompt=PROMPT, seed=1, num_images=n, num_inference_steps=args.steps,
                                        width=size, height=size, guidance_scale=2.0)
            generate_with_pipeline(pipe, request)  # warm-up of both paths
            batched(pipe, n, args.steps, size, seed=1)
            studio_t, batch_t = [], []
            for _ in range(args.repeats):
                t, result = timed(lambda request=request: generate_with_pipeline(pipe, request))
                studio_t.append(t)
                t, _ = timed(lambda n=n, size=size: batched(pipe, n, args.steps, size, seed=1))
                batch_t.append(t)
            s, b = statistics.median(studio_t) / n, statistics.median(batch_t) / n
            batches = sorted({o.request.batch_size for o in result.outputs}, reverse=True)
            print(f"{size:>4} px, {n:>2} images: studio {s * 1000:7.1f} ms/image (batches of {batches}) | "
                  f"diffusers batched {b * 1000:7.1f} ms/image | ratio studio/diffusers {s / b:.3f}")
        # Replay: the last image of a batch of the largest N, re-made from its recipe.
        n = max(args.images)
        request = GenerationRequest(prompt=PROMPT, seed=1, num_images=n, num_inference_steps=args.steps,
                                    width=size, height=size, guidance_scale=2.0)
        t_batch, result = timed(lambda request=request: generate_with_pipeline(pipe, request))
        last = result.outputs[-1]
        replay_t = []
        for _ in range(args.repeats):
            t, again = timed(lambda last=last: generate_with_pipeline(pipe, last.request))
            replay_t.append(t)
        same = again.outputs[0].image.tobytes() == last.image.tobytes()
        r = statistics.median(replay_t)
        print(f"{size:>4} px replay of image {n - 1} of a batch of {last.request.batch_size}: {r * 1000:7.1f} ms | "
              f"the batch {t_batch * 1000:7.1f} ms, {t_batch / n * 1000:6.1f} ms/image | "
              f"replay / batch {r / t_batch:.2f}, replay / image's share {r / (t_batch / n):.1f}"
              f" | bit-identical: {same}")


if __name__ == "__main__":
    main()
