"""X/Y grids (A1111's X/Y plot): one request, varied along one or two axes, drawn as one labelled PNG.

Holds :class:`GridAxis` (what varies: adapter strength or adapter version of one stack entry, seed,
prompt), :func:`render_grid` (generate every cell through ``studio.generation.run.generate``, save each
image with its own recipe, draw the grid) and :class:`GridResult` (the grid's path, every image's path,
the labels). The CLI's ``lora-studio grid`` and the Streamlit pages call :func:`render_grid`.

Does not hold: generation itself (``studio.generation.run``); cells are ordinary requests, so every cell
image re-runs alone from its recipe, and changing only strengths between cells never reads an adapter
file twice (``adapters.compose``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from adapters.compose import AdapterSpec, resolve_adapter
from studio.core.atomic import write_atomic
from studio.core.errors import InvalidRequestError
from studio.generation.prompt_tags import expand_prompt_tags
from studio.generation.requests import MAX_SEED, GenerationRequest
from studio.generation.run import generate

AXIS_KINDS = ("strength", "seed", "version", "checkpoint", "prompt")
STACK_KINDS = ("strength", "version", "checkpoint")  # axes that vary one entry of the adapter stack
MAX_VALUES = 16  # per axis: a 16 x 16 grid is 256 generations, already minutes on a GPU
MIN_CELL = 96  # grid cells are shown at least this many pixels wide (nearest-neighbour upscale of tiny images)
GRID_KEY = "lora_studio_grid"  # PNG text chunk of the grid image: axes, base request, cell files


@dataclass(frozen=True)
class GridAxis:
    """One axis of a grid: what varies and its values, in order.

    ``strength`` values are adapter weights (floats in [-4, 4]) and ``version`` values are registry
    versions (``3`` or ``"mystyle@3"``/``"mystyle@prod"``) of the stack entry ``entry`` (0-based);
    ``checkpoint`` values are adapter files put in that entry's place (a training run's checkpoints:
    ``studio.app.runs.checkpoint_axis`` gives them with their labels); ``seed`` values are whole
    numbers; ``prompt`` values are prompts.
    """

    kind: str = field(metadata={"help": f"what varies: {', '.join(AXIS_KINDS)}"})
    values: tuple = field(metadata={"help": "the values, in the order they are drawn"})
    entry: int = field(default=0, metadata={"help": "strength/version/checkpoint axes: which adapter of the stack "
                                                    "(0-based)"})
    labels: tuple | None = field(default=None, metadata={"help": "what each value is called in the grid (default: "
                                                                 "the value itself)"})

    def __post_init__(self) -> None:
        if self.kind not in AXIS_KINDS:
            raise InvalidRequestError(f"unknown grid axis {self.kind!r}: choose one of {', '.join(AXIS_KINDS)}")
        values = tuple(self.values) if isinstance(self.values, (list, tuple)) else None
        if not values:
            raise InvalidRequestError(f"the {self.kind} axis needs at least one value")
        if len(values) > MAX_VALUES:
            raise InvalidRequestError(f"the {self.kind} axis has {len(values)} values: at most {MAX_VALUES}")
        if isinstance(self.entry, bool) or not isinstance(self.entry, int) or self.entry < 0:
            raise InvalidRequestError(f"the {self.kind} axis' stack entry must be a whole number >= 0")
        for v in values:
            if self.kind == "strength" and (isinstance(v, bool) or not isinstance(v, (int, float))
                                            or not math.isfinite(v) or abs(v) > 4):
                raise InvalidRequestError(f"strength {v!r} must be a number in [-4, 4]")
            if self.kind == "seed" and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32):
                raise InvalidRequestError(f"seed {v!r} must be a whole number between 0 and {2**32 - 1}")
            if self.kind == "version" and not ((isinstance(v, int) and not isinstance(v, bool) and v >= 1)
                                               or (isinstance(v, str) and v.strip())):
                raise InvalidRequestError(f"version {v!r} must be a number >= 1 or a reference like name@3")
            if self.kind == "prompt" and not isinstance(v, str):
                raise InvalidRequestError(f"prompt {v!r} must be text")
            if self.kind == "checkpoint" and not (isinstance(v, str) and v.endswith(".safetensors")):
                raise InvalidRequestError(f"checkpoint {v!r} must be an adapter file (.safetensors)")
        if len(set(values)) != len(values):
            raise InvalidRequestError(f"the {self.kind} axis repeats a value: {list(values)}")
        object.__setattr__(self, "values", values)
        if self.labels is not None:
            labels = tuple(str(label) for label in self.labels)
            if len(labels) != len(values):
                raise InvalidRequestError(f"the {self.kind} axis has {len(values)} values and {len(labels)} labels")
            object.__setattr__(self, "labels", labels)

    @property
    def title(self) -> str:
        if self.kind in STACK_KINDS:
            return f"{self.kind} of adapter {self.entry + 1}"
        return self.kind

    def label(self, value) -> str:
        if self.labels is not None:
            return self.labels[self.values.index(value)]
        if self.kind == "strength":
            return f"{value:g}"
        if self.kind == "version" and isinstance(value, int):
            return f"v{value}"
        return str(value)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "values": list(self.values), "entry": self.entry}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def parse(cls, text: str, checkpoints=None) -> GridAxis:
        """The CLI form ``KIND[@N]=V1,V2,...``: ``strength=0,0.5,1``, ``strength@2=0,1`` (the 2nd
        ``--adapter``), ``seed=1,2,3``, ``version=1,2,prod``, ``prompt=a red circle|a blue square``
        (prompts are separated by ``|``, since they contain commas), ``checkpoint=a.safetensors,b.safetensors``.
        ``checkpoints(text) -> (files, labels)`` reads other checkpoint values (the CLI's ``RUN[:STEPS]``)."""
        head, sep, tail = text.partition("=")
        if not sep:
            raise InvalidRequestError(f"grid axis {text!r} must look like KIND=V1,V2 (e.g. strength=0,0.5,1)")
        kind, at, number = head.strip().partition("@")
        entry = 0
        if at:
            if not number.isdigit() or int(number) < 1:
                raise InvalidRequestError(f"in {text!r}, @N names the N-th --adapter (N >= 1)")
            entry = int(number) - 1
        if kind.strip() == "checkpoint" and checkpoints is not None and not tail.strip().endswith(".safetensors"):
            files, labels = checkpoints(tail.strip())
            return cls(kind="checkpoint", values=tuple(files), entry=entry, labels=tuple(labels))
        raw = [v.strip() for v in tail.split("|" if kind == "prompt" else ",")]
        if any(not v for v in raw):
            raise InvalidRequestError(f"grid axis {text!r} has an empty value")
        try:
            if kind == "strength":
                values = [float(v) for v in raw]
            elif kind == "seed":
                values = [int(v) for v in raw]
            elif kind == "version":
                values = [int(v) if v.isdigit() else v for v in raw]
            else:
                values = raw
        except ValueError as e:
            raise InvalidRequestError(f"grid axis {text!r}: {e}") from None
        return cls(kind=kind.strip(), values=tuple(values), entry=entry)


@dataclass
class GridResult:
    """What :func:`render_grid` made: the grid PNG, each cell's PNG (``image_paths[row][column]``,
    each with its recipe) and the labels drawn."""

    grid_path: Path
    image_paths: list[list[Path]]
    x_title: str
    x_labels: list[str]
    y_title: str | None
    y_labels: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return {"grid_path": str(self.grid_path), "image_paths": [[str(p) for p in row] for row in self.image_paths],
                "x_title": self.x_title, "x_labels": self.x_labels, "y_title": self.y_title,
                "y_labels": self.y_labels, "seconds": round(self.seconds, 3)}


def _cell_request(request: GenerationRequest, axes: list[tuple[GridAxis, object]]) -> GenerationRequest:
    changes: dict = {"num_images": 1}
    stack = list(request.adapters)
    for axis, value in axes:
        if axis.kind == "seed":
            changes["seed"] = value
        elif axis.kind == "prompt":
            changes["prompt"] = value
        elif axis.kind == "strength":
            # the axis is the adapter's strength: per-role overrides would hide it
            stack[axis.entry] = replace(stack[axis.entry], weight=float(value), denoiser=None, text_encoders=None)
        else:  # version, checkpoint: another adapter in the entry's place
            # the pins described the previous version
            stack[axis.entry] = replace(stack[axis.entry], ref=value, name=None, version=None, tensor_sha256=None)
    return replace(request, adapters=stack, **changes)


def _version_refs(request: GenerationRequest, axis: GridAxis) -> list[str]:
    """Version numbers and aliases (``3``, ``prod``) -> ``name@3`` of the entry's registry adapter;
    full references (``name@3``, ``sha256:...``) are kept."""
    refs = []
    name = None
    for v in axis.values:
        if isinstance(v, str) and ("@" in v or v.startswith("sha256:")):
            refs.append(v)
            continue
        if name is None:
            resolved = resolve_adapter(request.adapters[axis.entry].ref)
            if resolved.version is None:
                raise InvalidRequestError(
                    f"adapter {axis.entry + 1} of the stack is a file, which has no versions: give the version "
                    f"axis full references (name@3), or put a registry adapter in the stack")
            name = resolved.name
        refs.append(f"{name}@{v}")
    return refs


def render_grid(request: GenerationRequest, x: GridAxis, y: GridAxis | None = None, out_dir: str | Path = ".", *,
                stem: str | None = None, progress=None) -> GridResult:
    """Generate ``request`` for every (x, y) value pair and draw the grid; ``y`` may be None (one row).

    Cells use ``num_images=1``; without a seed axis every cell gets the request's seed (a random one,
    chosen once, when it has none), so cells differ only along the axes. Files go to ``out_dir``:
    ``<stem>-grid.png`` and ``<stem>-r<row>-c<col>.png``; nothing is overwritten.
    ``progress(done, total)`` is called after each cell.
    """
    if not isinstance(request, GenerationRequest):
        raise InvalidRequestError("render_grid needs a GenerationRequest")
    request = expand_prompt_tags(request)  # the prompt's <lora:...> tags join the stack an axis can pick
    axes = [a for a in (x, y) if a is not None]
    if y is not None and (x.kind, x.entry if x.kind in STACK_KINDS else 0) == (
            y.kind, y.entry if y.kind in STACK_KINDS else 0):
        raise InvalidRequestError(f"both axes vary the {x.title}: pick two different things")
    checkpoint = next((a for a in axes if a.kind == "checkpoint"), None)
    if checkpoint is not None and checkpoint.entry == 0 and not request.adapters:
        # A run's checkpoints with nothing else: they are the stack, each put in its place at strength 1
        request = replace(request, adapters=[AdapterSpec(checkpoint.values[0], 1.0)])
    for axis in axes:
        if axis.kind in STACK_KINDS and axis.entry >= len(request.adapters):
            raise InvalidRequestError(
                f"the {axis.title} axis needs a stack with at least {axis.entry + 1} adapter(s); the request has "
                f"{len(request.adapters)}: add --adapter REF")
    values = {id(a): (_version_refs(request, a) if a.kind == "version" else list(a.values)) for a in axes}
    if request.seed is None:
        request = replace(request, seed=random.SystemRandom().randrange(0, MAX_SEED))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(out_dir, stem or time.strftime("%Y%m%d-%H%M%S"))
    rows = values[id(y)] if y is not None else [None]
    cols = values[id(x)]
    t0 = time.perf_counter()
    images, paths = [], []
    family = None  # the base model's, from the first cell: it spells the adapters' strengths in the grid's chunk
    done, total = 0, len(rows) * len(cols)
    for r, y_value in enumerate(rows):
        row_images, row_paths = [], []
        for c, x_value in enumerate(cols):
            pairs = [(x, x_value)] + ([(y, y_value)] if y is not None else [])
            out = generate(_cell_request(request, pairs)).outputs[0]
            family = family or out.family
            row_paths.append(out.save(out_dir / f"{stem}-r{r:02d}-c{c:02d}.png"))
            row_images.append(out.image)
            done += 1
            if progress is not None:
                progress(done, total)
        images.append(row_images)
        paths.append(row_paths)
    x_labels = [x.label(v) for v in x.values]
    y_labels = [y.label(v) for v in y.values] if y is not None else []
    canvas = draw_grid(images, x.title, x_labels, y.title if y is not None else None, y_labels)
    info = {"x": x.to_dict(), "y": y.to_dict() if y is not None else None, "request": request.to_dict(family),
            "cells": [[p.name for p in row] for row in paths]}
    grid_path = _save_png(canvas, out_dir / f"{stem}-grid.png", {GRID_KEY: json.dumps(info, ensure_ascii=False)})
    return GridResult(grid_path=grid_path, image_paths=paths, x_title=x.title, x_labels=x_labels,
                      y_title=y.title if y is not None else None, y_labels=y_labels,
                      seconds=time.perf_counter() - t0)


def _free_stem(out_dir: Path, stem: str) -> str:
    candidate, n = stem, 1
    while (out_dir / f"{candidate}-grid.png").exists():
        candidate = f"{stem}-{n}"
        n += 1
    return candidate


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Word-wrap ``text`` to ``width`` pixels in at most ``max_lines`` lines (the last one cut with '…')."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    out = []
    for line in lines:
        while draw.textlength(line, font=font) > width and len(line) > 1:
            line = line[:-2] + "…"
        out.append(line)
    return out


def draw_grid(images: list[list], x_title: str, x_labels: list[str], y_title: str | None,
              y_labels: list[str]):
    """One PIL image: the cells in rows and columns, the x labels above, the y labels to the left."""
    w, h = images[0][0].size
    scale = max(1, math.ceil(MIN_CELL / max(w, h)))  # integer factor: nearest-neighbour keeps pixels crisp
    cw, ch = w * scale, h * scale
    font, title_font = _font(12), _font(13)
    line = 15
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x_lines = [_fit(probe, t, font, cw - 4) for t in x_labels]
    left = 0
    y_lines = []
    if y_labels:
        left = min(220, max(int(probe.textlength(t, font=font)) for t in y_labels) + 12)
        left = max(left, int(probe.textlength(y_title or "", font=title_font)) + 12, 60)
        y_lines = [_fit(probe, t, font, left - 8, max_lines=max(1, ch // line)) for t in y_labels]
    top = line + 6 + line * max(len(lines) for lines in x_lines) + 4
    gap = 2
    cols, rows = len(images[0]), len(images)
    canvas = Image.new("RGB", (left + cols * (cw + gap), top + rows * (ch + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left + 2, 2), x_title, fill="black", font=title_font)
    if y_title:
        draw.text((4, 2), y_title, fill="black", font=title_font)
    for c, lines in enumerate(x_lines):
        for i, text in enumerate(lines):
            draw.text((left + c * (cw + gap) + 2, line + 6 + i * line), text, fill="black", font=font)
    for r, row in enumerate(images):
        y0 = top + r * (ch + gap)
        if y_lines:
            for i, text in enumerate(y_lines[r]):
                draw.text((4, y0 + 2 + i * line), text, fill="black", font=font)
        for c, image in enumerate(row):
            canvas.paste(image.resize((cw, ch), Image.NEAREST) if scale > 1 else image, (left + c * (cw + gap), y0))
    return canvas


def _save_png(image, path: Path, text: dict[str, str]) -> Path:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))  # never half a grid
