"""Generation speed of the tiny model: the studio's path vs one batched diffusers call, side by side.

The studio denoises a request's images in batches and records each image's batch in its recipe, so
that any image re-runs bit for bit. This measures, in one run:

- variations: N images of one prompt through ``generate_with_pipeline`` (recipes, adapters check,
  everything a CLI or page request does) against a plain batched diffusers call
  (``num_images_per_prompt=N``, a list of per-image generators); goal: ratio <= 1.05;
- replay: re-making one image of a batch of N from its recipe (the batch is rebuilt) against the
  time the batch took per image and in all;
- sessions: S sessions submit K images each at once to the studio's generation queue (prompts and
  seeds differ); the time until the last image against one batched diffusers call making the same
  S x K images, and the longest wait of any session against its fair share (S x the time its own K
  images take in one batched call: what an equal split of the machine would give it).

    .venv/bin/python benchmarks/generate_speed.py [--images 4 16] [--steps 20] [--sizes 32 64] [--repeats 3]
        [--sessions 8] [--session-images 4]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from studio.core.base_models import load_pipeline
from studio.generation.queue import DONE, GenerationQueue
from studio.generation.requests import GenerationRequest, make_scheduler
from studio.generation.run import generate_with_pipeline

PROMPT = "a red circle on a blue background"


def batched(pipe, n: int, steps: int, size: int, seed: int):
    """What a plain diffusers script does: one call, one prompt, N images."""
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=2.0, width=size, height=size,
                generator=gens, num_images_per_prompt=n).images


def batched_prompts(pipe, prompts: list[str], seeds: list[int], steps: int, size: int):
    """One diffusers call for several prompts, one image each."""
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=2.0, width=size, height=size,
                generator=gens).images


SESSION_PROMPTS = ["a red circle on a blue background", "a green square on a white background",
                   "a blue triangle on a yellow background", "a white circle on a red background",
                   "a yellow square on a blue background", "a red triangle on a green background",
                   "a blue circle on a white background", "a green triangle on a red background"]


def sessions(pipe, n_sessions: int, images: int, steps: int, size: int) -> None:
    queue = GenerationQueue()
    prompts = [SESSION_PROMPTS[i % len(SESSION_PROMPTS)] for i in range(n_sessions)]
    requests = [GenerationRequest(prompt=p, seed=100 * i, num_images=images, num_inference_steps=steps, width=size,
                                  height=size, guidance_scale=2.0) for i, p in enumerate(prompts)]
    queue.wait(queue.submit(requests[0], "warm-up"))
    waits = [0.0] * n_sessions
    start = threading.Barrier(n_sessions + 1)

    def session(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        job = queue.submit(requests[i], f"session-{i}")
        queue.wait(job)
        assert job.state == DONE, job.error
        waits[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    queue.close()
    all_prompts = [p for p in prompts for _ in range(images)]
    all_seeds = [100 * i + k for i in range(n_sessions) for k in range(images)]
    one_call, _ = timed(lambda: batched_prompts(pipe, all_prompts, all_seeds, steps, size))
    own, _ = timed(lambda: batched_prompts(pipe, all_prompts[:images], all_seeds[:images], steps, size))
    fair = n_sessions * own
    print(f"{size:>4} px, {n_sessions} sessions x {images} images through the queue: {total:6.2f} s | one batched "
          f"diffusers call of {n_sessions * images}: {one_call:6.2f} s | ratio {total / one_call:.3f} | longest wait "
          f"{max(waits):6.2f} s, shortest {min(waits):6.2f} s | fair share {fair:6.2f} s ({n_sessions} x {own:.2f} s) "
          f"| longest wait / fair share {max(waits) / fair:.3f}")


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
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--session-images", type=int, default=4)
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
        if args.sessions:
            sessions(pipe, args.sessions, args.session_images, args.steps, size)


if __name__ == "__main__":
    main()
