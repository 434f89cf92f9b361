"""A1111's extra-network prompt syntax: ``<lora:NAME:W>`` tags in a prompt join the adapter stack.

People paste prompts from Civitai and A1111 that carry their LoRAs as tags. A1111's rules (its
``extra_networks_lora.py``), kept here:

- ``<lora:NAME>`` is weight 1; ``<lora:NAME:W>`` sets the text-encoder weight, which the UNet (the
  denoiser) takes too; ``<lora:NAME:W_TE:W_UNET>`` sets both; the named forms ``te=W`` and ``unet=W``
  override the positional ones. ``<lyco:...>`` (the LyCORIS extension's tag) reads the same way.
- Tags are taken out of the text the model reads; only the prompt carries them (A1111 leaves the
  negative prompt's text as it is, so the studio refuses tags there instead of reading them as words).
- NAME is resolved in the registry by :meth:`adapters.registry.Registry.find_network` (a name or
  reference, a hash, or the file name it was imported from).

The tags become ordinary :class:`adapters.compose.AdapterSpec` entries after the stack given by other
means, so the recipe records the resolved stack and a cleaned prompt, and replays without the tags.
:func:`stack_tags` writes the stack back as tags for the ``parameters`` text A1111 reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from adapters.compose import AdapterSpec
from studio.core.errors import InvalidRequestError

# A1111's extra-network pattern: <kind:params>, params without '>'.
TAG = re.compile(r"<(\w+):([^>]+)>")
NETWORK_KINDS = ("lora", "lyco")
# Other extra-network kinds A1111 reads: named, so the user learns why nothing happened to them.
UNSUPPORTED_KINDS = {"hypernet": "hypernetworks", "embedding": "textual-inversion embeddings"}


@dataclass(frozen=True)
class PromptTag:
    """One ``<lora:...>`` tag: the name as written and the two weights it sets."""

    text: str
    name: str
    te: float
    unet: float

    def spec(self, ref: str) -> AdapterSpec:
        """The stack entry: one weight when both are equal (as ``--adapter NAME:W``), else per role."""
        return AdapterSpec(ref=ref, weight=self.te, denoiser=None if self.unet == self.te else self.unet)


def _number(value: str, tag: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequestError(f"{tag}: the {what} {value!r} is not a number; write it like <lora:NAME:0.8> "
                                  f"or <lora:NAME:te=0.5:unet=1>") from None
    if not math.isfinite(number):
        raise InvalidRequestError(f"{tag}: the {what} must be a finite number, got {value}")
    return number


def parse_tags(prompt: str) -> tuple[str, list[PromptTag]]:
    """``prompt`` without its LoRA tags (spaces left by them collapsed), and the tags in prompt order."""
    tags: list[PromptTag] = []
    for match in TAG.finditer(prompt):
        kind, body, text = match.group(1).lower(), match.group(2), match.group(0)
        if kind in UNSUPPORTED_KINDS:
            raise InvalidRequestError(f"{text}: the studio does not load {UNSUPPORTED_KINDS[kind]}; remove the tag "
                                      f"(LoRA tags, <lora:NAME:W>, are read)")
        if kind not in NETWORK_KINDS:
            continue  # not an extra network A1111 knows: ordinary prompt text
        positional, named = [], {}
        for item in body.split(":"):
            key, eq, value = item.partition("=")
            if eq:
                named[key.strip().lower()] = value.strip()
            else:
                positional.append(item.strip())
        if not positional or not positional[0]:
            raise InvalidRequestError(f"{text} names no adapter: write <lora:NAME:WEIGHT>")
        unknown = sorted(set(named) - {"te", "unet", "dyn"})
        if unknown:
            raise InvalidRequestError(f"{text}: unknown option {unknown[0]!r}; A1111's are te= and unet=")
        if "dyn" in named or len(positional) > 3:
            raise InvalidRequestError(f"{text}: the dynamic-rank option (dyn, the fourth number) cuts a LyCORIS "
                                      f"file's rank at load time and the studio does not; remove it")
        te = _number(positional[1], text, "weight") if len(positional) > 1 else 1.0
        te = _number(named["te"], text, "te weight") if "te" in named else te
        unet = _number(positional[2], text, "unet weight") if len(positional) > 2 else te
        unet = _number(named["unet"], text, "unet weight") if "unet" in named else unet
        tags.append(PromptTag(text=text, name=positional[0], te=te, unet=unet))
    if not tags:
        return prompt, []
    cleaned = TAG.sub(lambda m: "" if m.group(1).lower() in NETWORK_KINDS else m.group(0), prompt)
    return re.sub(r"[ \t]{2,}", " ", cleaned).strip(), tags


def expand_prompt_tags(request, registry=None, short_hashes: dict[str, str] | None = None):
    """``request`` with the LoRA tags of its prompt moved into its adapter stack (after the entries it
    has), each resolved in the registry; unchanged when the prompt has none.

    ``short_hashes`` maps tag names to the hashes an A1111 image's ``Lora hashes`` gave them, tried
    when a name alone finds nothing. An unknown name is an error listing close matches.
    """
    _, negative_tags = parse_tags(request.negative_prompt)
    if negative_tags:
        raise InvalidRequestError(f"{negative_tags[0].text} is in the negative prompt: A1111 reads LoRA tags in the "
                                  f"prompt only; move it there")
    prompt, tags = parse_tags(request.prompt)
    if not tags:
        return request
    if registry is None:
        from adapters.registry import Registry

        registry = Registry()
    specs = [tag.spec(registry.find_network(tag.name, (short_hashes or {}).get(tag.name)).ref) for tag in tags]
    return replace(request, prompt=prompt, adapters=[*request.adapters, *specs])


def stack_tags(stack: list[AdapterSpec]) -> str:
    """The stack as A1111 writes it into a prompt: ``<lora:NAME:W>`` (``<lora:NAME:W_TE:W_UNET>`` when
    the roles differ; per-block weights are written as the adapter's overall weight, which is all A1111's
    own syntax can say)."""
    out = []
    for spec in stack:
        name = spec.name or spec.ref
        te = spec.text_encoder_weight
        unet = spec.denoiser if spec.denoiser is not None and spec.blocks is None else spec.weight
        out.append(f"<lora:{name}:{te:g}>" if unet == te else f"<lora:{name}:{te:g}:{unet:g}>")
    return " ".join(out)
