"""Prompt adherence of the tiny model: generate a fixed prompt x seed grid and grade it.

The grid covers every colour twice as object and twice as background and every shape four times,
so a model that ignores any word of the caption template scores visibly lower.
"""

from __future__ import annotations

from pathlib import Path

from studio.app.tiny.scenes import parse_caption, read_scene, score

QUALITY_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a green square on a yellow background",
    "a blue triangle on a white background",
    "a yellow circle on a black background",
    "a white square on a red background",
    "a black triangle on a green background",
    "a red triangle on a white background",
    "a green circle on a black background",
    "a blue square on a red background",
    "a yellow triangle on a green background",
    "a white circle on a blue background",
    "a black square on a yellow background",
)


def measure_quality(base: str | Path = "tiny", seeds=(1, 2, 3), steps: int = 20, guidance_scale: float | None = None,
                    scheduler: str = "Euler", prompts=QUALITY_PROMPTS) -> dict:
    """Rates of images whose object colour, background colour and shape match the prompt.

    Generation goes through :func:`studio.generation.run.generate`, the same path users take.
    """
    from studio.generation.requests import GenerationRequest
    from studio.generation.run import generate

    readings, expected, failures = [], [], []
    for prompt in prompts:
        result = generate(GenerationRequest(prompt=prompt, base_model=str(base), seed=seeds[0], num_images=len(seeds),
                                            batch_size=1,  # as the build reports measured: one at a time
                                            num_inference_steps=steps, guidance_scale=guidance_scale,
                                            scheduler=scheduler))
        want = parse_caption(prompt)
        for image, seed in zip(result.images, result.seeds):
            reading = read_scene(image)
            readings.append(reading)
            expected.append(want)
            saw = [reading.colour, reading.background, reading.shape]
            if saw != [want["colour"], want["background"], want["shape"]]:
                failures.append({"prompt": prompt, "seed": seed, "saw": saw})
    rates = score(readings, expected)
    return {**rates, "images": len(readings), "failures": failures}
