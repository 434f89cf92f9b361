"""Adapter composition cost on the tiny model, measured side by side in one run.

Per-image time for: the base model, 1 and 3 adapters unfused, 3 adapters fused (ratios to base);
the time to change the strengths of a loaded, fused stack, the engine's way beside diffusers'
unfuse_lora + set_adapters (and how many files either read); the time to bring in an adapter that is
not loaded yet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compose.py [--images 4] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapters.compose import AdapterEngine, AdapterSpec, resolve_adapter
from studio.core.base_models import load_fresh_pipeline
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate_with_pipeline


def make_lora(out: Path, seed: int) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_fresh_pipeline("tiny")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=cfg.to_dict(), weight_name=f"bench{seed}.safetensors")
    return out / f"bench{seed}.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--changes", type=int, default=20, help="strength changes to time")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    paths = [make_lora(tmp, s) for s in range(4)]
    resolved = [resolve_adapter(str(p)) for p in paths]
    request = GenerationRequest(prompt="a red circle on a blue background", seed=1, num_images=args.images,
                                num_inference_steps=args.steps, guidance_scale=2.0)
    one = [AdapterSpec(str(paths[0]), 0.8)]
    three = [AdapterSpec(str(p), w) for p, w in zip(paths[:3], (0.8, 0.5, -0.3))]
    # One pipeline per configuration, measured round-robin, so machine drift hits every row alike.
    setups = {
        "base": (AdapterEngine(load_fresh_pipeline("tiny"), fuse=False), [], []),
        "1 adapter unfused": (AdapterEngine(load_fresh_pipeline("tiny"), fuse=False), one, resolved[:1]),
        "3 adapters unfused": (AdapterEngine(load_fresh_pipeline("tiny"), fuse=False), three, resolved[:3]),
        "3 adapters fused": (AdapterEngine(load_fresh_pipeline("tiny"), fuse=True), three, resolved[:3]),
    }
    times: dict[str, list[float]] = {label: [] for label in setups}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for label, (engine, stack, res) in setups.items():
            engine.apply(stack, res)
            engine.apply(stack, res)  # a repeated stack: the fusing engine fuses here
            t0 = time.perf_counter()
            generate_with_pipeline(engine.pipe, request)
            if round_:
                times[label].append((time.perf_counter() - t0) / args.images)
    assert setups["3 adapters fused"][0].is_fused
    base = statistics.median(times["base"])
    print(f"per image ({args.steps} steps, 32 px, median of {args.repeats} round-robin rounds): "
          f"base {base * 1000:.1f} ms")
    for label in list(setups)[1:]:
        t = statistics.median(times[label])
        goal = "  (goal <= 1.02)" if "fused" in label and "unfused" not in label else ""
        print(f"  {label:<19} {t * 1000:7.1f} ms  ratio to base {t / base:.3f}{goal}")
    fused_engine = setups["3 adapters fused"][0]

    # Changing the strengths of a loaded, fused 3-stack, two ways side by side on the same pipeline:
    # the engine (exact unfuse by copying the base weights back, then set_scale on its cached layers)
    # and diffusers' own calls (unfuse_lora + enable_lora + set_adapters, plus the same exact copy-back).
    loads_before = fused_engine.stats.loads
    opens = _count_opens()
    change_fused, change_unfused, change_diffusers = [], [], []
    for i in range(args.changes):
        fused_engine.apply(three, resolved[:3])
        fused_engine.apply(three, resolved[:3])  # now fused
        t0 = time.perf_counter()
        fused_engine.apply([AdapterSpec(s.ref, s.weight * 0.9 ** (i + 1)) for s in three], resolved[:3])
        change_fused.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fused_engine.apply([AdapterSpec(s.ref, s.weight * 0.8 ** (i + 1)) for s in three], resolved[:3])
        change_unfused.append(time.perf_counter() - t0)
    files_opened = opens()
    reads = fused_engine.stats.loads - loads_before
    pipe = fused_engine.pipe
    names = [fused_engine._loaded[r.key].adapter_name for r in resolved[:3]]
    for i in range(args.changes):
        fused_engine.apply(three, resolved[:3])
        fused_engine.apply(three, resolved[:3])
        t0 = time.perf_counter()
        pipe.unfuse_lora(components=["unet", "text_encoder"])
        with torch.no_grad():  # the exact copy-back the engine also does
            for key, module in fused_engine._fused_layers:
                for n, param in module.get_base_layer().named_parameters(recurse=False):
                    param.copy_(fused_engine._snapshot[key][n])
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[s.weight * 0.9 ** (i + 1) for s in three])
        change_diffusers.append(time.perf_counter() - t0)
        fused_engine._fused, fused_engine._fused_layers, fused_engine._set_names = None, [], None
    fast, slow = statistics.median(change_fused), statistics.median(change_diffusers)
    print(f"change strengths of a loaded 3-stack (median of {args.changes}): from fused {fast * 1000:.1f} ms "
          f"(goal <= 10 ms), from unfused {statistics.median(change_unfused) * 1000:.1f} ms; "
          f"diffusers unfuse_lora + set_adapters {slow * 1000:.1f} ms; ratio {slow / fast:.1f}x")
    print(f"  files read while changing strengths: {reads} adapter loads, {files_opened} files opened")
    t0 = time.perf_counter()
    fused_engine.apply(three + [AdapterSpec(str(paths[3]), 0.5)], resolved)
    print(f"bring in an adapter not yet loaded: {(time.perf_counter() - t0) * 1000:.1f} ms "
          f"(loads {fused_engine.stats.loads - loads_before - reads})")


def _count_opens():
    """Count files opened from now on (Python's audit hook sees every open(), os.open and io.open)."""
    import sys

    count = [0]
    active = [True]

    def hook(event, _args):
        if active[0] and event == "open":
            count[0] += 1

    sys.addaudithook(hook)

    def stop() -> int:
        active[0] = False
        return count[0]

    return stop

if __name__ == "__main__":
    main()
