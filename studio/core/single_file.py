"""Pipelines as one safetensors file in their family's original (A1111/ComfyUI) key layout, and back.

Which components go in, under which key prefixes, as which classes, and with which renaming is the
family's :class:`~studio.core.families.base.SingleFileLayout`; this module holds the renamings and
the file handling. SD-1's layout is the original Stable Diffusion (LDM) one: the UNet, VAE and CLIP
text encoder under ``model.diffusion_model.*``, ``first_stage_model.*`` and
``cond_stage_model.transformer.*``. :func:`write_single_file` is the inverse of diffusers' own
single-file conversion (``diffusers.loaders.single_file_utils``): diffusers loads what this writes
and gets back the very same tensors. The SD UNet's and VAE's LDM renamings are shared by the
families built on them; a layout reaches them by name (:data:`CONVERTERS`), so a file is only ever
converted the way its own family's layout says.

The file's safetensors metadata names the format and carries the diffusers component configs as
JSON (``lora_studio.configs``). :func:`single_file_config_dir` turns those back into a config folder
for ``from_single_file``, so checkpoints not shaped like the family's reference model (the embedded
tiny model, say) load offline too; files without them (A1111/Civitai downloads) use the layout's
configs. Nothing here imports torch or diffusers at import time.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from studio.core.atomic import write_atomic
from studio.core.errors import CorruptWeightsError, InvalidRequestError
from studio.core.families import FAMILIES, family_of_pipeline
from studio.core.families.base import Family, SingleFileLayout

FORMAT_KEY = "lora_studio.format"
FORMAT_VERSION_KEY = "lora_studio.format_version"
FORMAT_VERSION = "1"
CONFIGS_KEY = "lora_studio.configs"
TOKENIZERS_KEY = "lora_studio.tokenizers"
# The entry of the configs JSON that holds the pipeline's own true/false options (model_index.json's).
PIPELINE_OPTIONS = "_pipeline"
# What a file may record about a tokenizer: the special tokens the loader sets (at most a few characters each).
_TOKENIZER_OPTIONS = ("pad_token",)
# The file names diffusers gives a model's and a scheduler's config inside a pipeline folder.
MODEL_CONFIG_FILE = "config.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"

DTYPES = ("float32", "float16", "bfloat16")

_UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers ResnetBlock2D parameter names -> LDM ResBlock names (UNet) / ResnetBlock names (VAE).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# diffusers VAE mid-block Attention -> LDM AttnBlock, whose projections are 1x1 convolutions.
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# --------------------------------------------------------------------------------------------
# diffusers -> LDM key mapping
# --------------------------------------------------------------------------------------------


def _rename(key: str, prefixes: dict[str, tuple[str, dict[str, str]]], what: str) -> str:
    """Map ``key`` by its longest matching module prefix, renaming the parameter's own module path."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            target, names = prefixes[prefix]
            rest = ".".join(parts[cut:])
            module, _, param = rest.rpartition(".")
            if module in names:
                rest = f"{names[module]}.{param}"
            return f"{target}.{rest}"
    raise InvalidRequestError(
        f"the {what} has a weight {key!r} with no place in the original (LDM) layout: only plain pipelines "
        f"can be exported (fuse or unload LoRA adapters first)"
    )


def _unet_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers UNet module prefix -> (LDM prefix, renames inside it), for an SD-UNet-shaped config."""
    down_types = list(config.get("down_block_types") or ())
    up_types = list(config.get("up_block_types") or ())
    per_block = config.get("layers_per_block")
    problems = []
    if not isinstance(per_block, int):
        problems.append(f"layers_per_block {per_block!r} is not one number")
    if not down_types or any(t not in _UNET_DOWN_BLOCKS for t in down_types):
        problems.append(f"down blocks {down_types} are not all of {_UNET_DOWN_BLOCKS}")
    if len(up_types) != len(down_types) or any(t not in _UNET_UP_BLOCKS for t in up_types):
        problems.append(f"up blocks {up_types} are not all of {_UNET_UP_BLOCKS}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid block {config.get('mid_block_type')!r} is not UNetMidBlock2DCrossAttn")
    for option in ("class_embed_type", "addition_embed_type", "num_class_embeds", "time_cond_proj_dim"):
        if config.get(option) is not None and not (option == "addition_embed_type" and config[option] == "text_time"):
            problems.append(f"{option} is set")
    if problems:
        raise InvalidRequestError("the UNet is not SD-UNet shaped, so it has no LDM layout: " + "; ".join(problems))

    plain: dict[str, str] = {}
    resnet = _UNET_RESNET_NAMES
    prefixes = {
        "time_embedding.linear_1": ("time_embed.0", plain),
        "time_embedding.linear_2": ("time_embed.2", plain),
        "conv_in": ("input_blocks.0.0", plain),
        "conv_norm_out": ("out.0", plain),
        "conv_out": ("out.2", plain),
        # LDM's middle block is one sequence: ResBlock, SpatialTransformer, ResBlock.
        "mid_block.resnets.0": ("middle_block.0", resnet),
        "mid_block.attentions.0": ("middle_block.1", plain),
        "mid_block.resnets.1": ("middle_block.2", resnet),
    }
    if config.get("addition_embed_type") == "text_time":
        # SDXL (SGM): the pooled text embedding and the size numbers' MLP is ``label_emb.0``.
        prefixes["add_embedding.linear_1"] = ("label_emb.0.0", plain)
        prefixes["add_embedding.linear_2"] = ("label_emb.0.2", plain)
    # LDM numbers the down path as one flat list after conv_in: each block's layers, then its
    # downsampler (every block but the last) as an entry of its own.
    index = 1
    for block in range(len(down_types)):
        for layer in range(per_block):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", resnet)
            prefixes[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", plain)
            index += 1
        if block < len(down_types) - 1:
            prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", plain)
            index += 1
    # The up path: layers_per_block + 1 entries per block; the upsampler rides in the block's last
    # entry, after the transformer where the block has one (index 2), else after the ResBlock (1).
    index = 0
    for block, block_type in enumerate(up_types):
        for layer in range(per_block + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", resnet)
            prefixes[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", plain)
            if layer == per_block and block < len(up_types) - 1:
                slot = 2 if block_type.startswith("CrossAttn") else 1
                prefixes[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", plain)
            index += 1
    return prefixes


def unet_to_ldm(state_dict: dict, config: dict) -> dict:
    """A diffusers ``UNet2DConditionModel`` state dict -> LDM UNet keys (``input_blocks.*``, ...), unprefixed."""
    prefixes = _unet_prefixes(dict(config))
    return {_rename(k, prefixes, "UNet"): v for k, v in state_dict.items()}


def ldm_unet_module_names(config: dict, names) -> dict[str, str]:
    """diffusers UNet module names -> their LDM/SGM names (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``), for each of ``names`` that has a place in the original layout (the
    containers above the blocks have none and are left out).

    kohya's SDXL files often spell the UNet this way (``lora_unet_input_blocks_4_1_proj_in``); this is
    the single-file export's own renaming, so the two can never disagree. Raises
    :class:`InvalidRequestError` for a UNet that is not SD-UNet shaped.
    """
    prefixes = _unet_prefixes(dict(config))
    out = {}
    for name in names:
        try:
            out[name] = _rename(f"{name}.weight", prefixes, "UNet").removesuffix(".weight")
        except InvalidRequestError:
            continue
    return out


def _vae_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    plain: dict[str, str] = {}
    resnet = _VAE_RESNET_NAMES
    blocks = len(config.get("down_block_types") or ())
    per_block = config.get("layers_per_block")
    if not blocks or not isinstance(per_block, int) or len(config.get("up_block_types") or ()) != blocks:
        raise InvalidRequestError("the VAE is not LDM shaped (AutoencoderKL with matching encoder and decoder)")
    prefixes = {name: (name, plain) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in"] = (f"{part}.conv_in", plain)
        prefixes[f"{part}.conv_out"] = (f"{part}.conv_out", plain)
        prefixes[f"{part}.conv_norm_out"] = (f"{part}.norm_out", plain)
        prefixes[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", resnet)
        prefixes[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", resnet)
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_NAMES)
    for block in range(blocks):
        prefixes[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (f"encoder.down.{block}.downsample.conv", plain)
        # The LDM decoder counts its up blocks from the lowest resolution: diffusers' first is LDM's last.
        ldm = blocks - 1 - block
        prefixes[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{ldm}.upsample.conv", plain)
        for layer in range(per_block + 1):  # the decoder has one more ResNet per block than the encoder
            prefixes[f"encoder.down_blocks.{block}.resnets.{layer}"] = (f"encoder.down.{block}.block.{layer}", resnet)
            prefixes[f"decoder.up_blocks.{block}.resnets.{layer}"] = (f"decoder.up.{ldm}.block.{layer}", resnet)
    return prefixes


def vae_to_ldm(state_dict: dict, config: dict) -> dict:
    """A diffusers ``AutoencoderKL`` state dict -> LDM VAE keys (``encoder.down.*``, ...), unprefixed.

    The mid-block attention's linear projections become the 1x1 convolutions of LDM's AttnBlock
    (``[C, C]`` -> ``[C, C, 1, 1]``), which is what diffusers' loader and A1111 expect.
    """
    prefixes = _vae_prefixes(dict(config))
    out = {}
    for key, value in state_dict.items():
        ldm = _rename(key, prefixes, "VAE")
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm) and value.ndim == 2:
            value = value[:, :, None, None]
        out[ldm] = value
    return out


def clip_text_to_ldm(state_dict: dict, config=None) -> dict:
    """A transformers ``CLIPTextModel`` state dict -> ``text_model.*`` keys, unprefixed (the LDM
    checkpoints keep the whole transformers model under the text encoder's prefix)."""
    out = {}
    for key, value in state_dict.items():
        # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the layout keeps it.
        if not key.startswith("text_model."):
            key = f"text_model.{key}"
        out[key] = value
    return out


# transformers CLIP layer names -> OpenCLIP's (the SDXL/SD-2 checkpoints' text towers).
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_text_to_ldm(state_dict: dict, config=None) -> dict:
    """A transformers ``CLIPTextModelWithProjection`` state dict -> OpenCLIP keys, unprefixed: what
    SDXL checkpoints hold under ``conditioner.embedders.1.model.``.

    OpenCLIP keeps q, k and v as one ``attn.in_proj_weight`` (rows q, then k, then v) and the text
    projection as a ``[width, projection]`` matrix, the transpose of transformers' Linear weight;
    diffusers' loader splits and transposes them back (``convert_open_clip_checkpoint``).
    """
    import torch

    out, qkv = {}, {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight" or key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
        elif name == "embeddings.position_ids":
            continue  # a buffer transformers rebuilds; not a weight
        elif name.startswith("encoder.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, _, param = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[-6]] = value
                continue
            if module not in _OPEN_CLIP_LAYER:
                raise InvalidRequestError(f"the text encoder has a weight {key!r} with no place in OpenCLIP's layout")
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
        else:
            raise InvalidRequestError(f"the text encoder has a weight {key!r} with no place in OpenCLIP's layout")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise InvalidRequestError(f"the text encoder's layer {layer} lacks one of q/k/v_proj.{param}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# The renamings a layout names (``SingleFileComponent.converter``): (state dict, config) -> the
# file's keys for that component, without its prefix.
CONVERTERS = {"ldm_unet": unet_to_ldm, "ldm_vae": vae_to_ldm, "ldm_clip_text": clip_text_to_ldm,
              "open_clip_text": open_clip_text_to_ldm}


def to_single_file(layout: SingleFileLayout, component: str, state_dict: dict, config) -> dict:
    """One component's state dict under the keys ``layout`` gives it (its renaming, then its prefix)."""
    part = layout.component(component)
    convert = CONVERTERS[part.converter]
    return {part.prefix + key: value for key, value in convert(state_dict, config).items()}


def layout_of(family: Family) -> SingleFileLayout:
    """``family``'s single-file layout, or a clear error naming the families that have one."""
    if family.single_file is None:
        having = ", ".join(f.display_name for f in FAMILIES.values() if f.single_file is not None)
        raise InvalidRequestError(f"the studio has no single-file layout for {family.display_name} "
                                  f"(it has one for: {having})")
    return family.single_file


def layout_of_format(name: str | None) -> SingleFileLayout | None:
    """The layout whose files carry ``lora_studio.format`` = ``name``; None if no family writes it."""
    return next((f.single_file for f in FAMILIES.values() if f.single_file and name in f.single_file.formats), None)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _component_configs(pipe, layout: SingleFileLayout) -> dict:
    """The diffusers/transformers configs of the exported components and the scheduler, as plain JSON values."""
    configs = {layout.scheduler: json.loads(getattr(pipe, layout.scheduler).to_json_string())}
    for part in layout.components:
        component = getattr(pipe, part.component)
        if part.library == "transformers":
            configs[part.component] = json.loads(component.config.to_json_string(use_diff=False))
        else:
            configs[part.component] = json.loads(component.to_json_string())
    # The pipeline's own switches (SDXL: force_zeros_for_empty_prompt): model_index.json's true/false values.
    configs[PIPELINE_OPTIONS] = {k: v for k, v in pipe.config.items() if not k.startswith("_") and isinstance(v, bool)}
    for config in configs.values():
        config.pop("_name_or_path", None)  # a path on the exporting machine: no use elsewhere
    return configs


def _pipeline_layout(pipe) -> tuple[Family, SingleFileLayout]:
    """The family and single-file layout of ``pipe``, after checking it holds the layout's classes."""
    try:
        family = family_of_pipeline(pipe)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{type(pipe).__name__} has no single-file layout: {e}") from None
    layout = layout_of(family)
    for part in layout.components:
        component = getattr(pipe, part.component, None)
        if component is None or type(component).__name__ != part.class_name:
            found = "nothing" if component is None else type(component).__name__
            raise InvalidRequestError(
                f"the pipeline's {part.component} is {found}, not {part.class_name}: only plain "
                f"{family.display_name} pipelines have its single-file layout"
            )
    return family, layout


def check_export_target(path: str | Path, dtype: str | None) -> Path:
    """``path`` as a Path if a single file may be written there in ``dtype``; checked before any model loads."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise InvalidRequestError(f"{path} must end in .safetensors: the studio writes safetensors files only")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return path


def write_single_file(pipe, path: str | Path, *, dtype: str | None = None) -> Path:
    """Write a loaded pipeline's weights as one safetensors file in its family's original layout (SD-1:
    the UNet, VAE and text encoder in the LDM layout).

    ``dtype`` (``float16``, ``bfloat16``, ``float32``) converts the floating-point weights; ``None``
    keeps the pipeline's. The file is written atomically (temp file in the same folder, then rename),
    mode 0644; an existing file at ``path`` is replaced. Returns ``path``. Exporting a base-model
    reference (``tiny``, a folder...) is :func:`studio.core.base_models.export_single_file`.
    """
    import torch

    path = check_export_target(path, dtype)
    family, layout = _pipeline_layout(pipe)
    state_dicts = {part.component: getattr(pipe, part.component).state_dict() for part in layout.components}
    for name, state_dict in state_dicts.items():
        if any(".base_layer." in k or ".lora_" in k for k in state_dict):
            raise InvalidRequestError(
                f"the pipeline's {name} has LoRA layers in it: fuse them (pipe.fuse_lora()) and unload them, "
                f"or export the base model without adapters"
            )

    tensors = {}
    for name, state_dict in state_dicts.items():
        tensors.update(to_single_file(layout, name, state_dict, getattr(pipe, name).config))
    target = getattr(torch, dtype) if dtype else None
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if target is not None and value.is_floating_point():
            value = value.to(target)
        tensors[key] = value.contiguous()
    metadata = {
        "format": "pt",  # what safetensors' torch helpers and A1111 write
        FORMAT_KEY: layout.format,
        FORMAT_VERSION_KEY: FORMAT_VERSION,
        CONFIGS_KEY: json.dumps(_component_configs(pipe, layout), sort_keys=True),
        TOKENIZERS_KEY: json.dumps({name: {option: str(getattr(getattr(pipe, name), option))
                                           for option in _TOKENIZER_OPTIONS}
                                    for name in layout.tokenizers}, sort_keys=True),
        "modelspec.architecture": family.modelspec_architecture,
    }

    # Streamed tensor by tensor through the studio's atomic writer: safetensors' own save_file would
    # hide a full disk in an errno-less SafetensorError, and save() would hold a second copy of a
    # multi-GB model in memory.
    write_atomic(path, lambda f: _write_safetensors(f, tensors, metadata), durable=True)
    return path


# safetensors' dtype names (the format's spec); a tensor of any other dtype cannot go in a file.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                       "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _write_safetensors(f, tensors: dict, metadata: dict[str, str]) -> None:
    """Write contiguous CPU ``tensors`` to the binary file ``f`` in the safetensors layout, one tensor at
    a time: 8 bytes little-endian header length, the JSON header padded with spaces to a multiple of 8,
    then each tensor's bytes. Wider dtypes go first (then by name), as safetensors orders them, so every
    tensor starts aligned to its element size for readers that map the file."""
    import torch

    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = tensors[key]
        name = str(t.dtype).removeprefix("torch.")
        if name not in _SAFETENSORS_DTYPES:
            raise InvalidRequestError(f"{key} is {name}, which a safetensors file cannot hold: export with "
                                      f"dtype float16, bfloat16 or float32")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[name], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little") + raw)
    for key in order:
        # Bytes as stored in memory (little-endian on every platform torch runs on), no copy made.
        f.write(tensors[key].reshape(-1).view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------------------------
# loading: configs from the file's metadata
# --------------------------------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``path`` (``{}`` when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError and OSError subclasses
        raise CorruptWeightsError(
            f"{path} cannot be read as safetensors ({e}); the file is damaged or not a weights file: "
            f"download or export it again"
        ) from None


def embedded_configs(path: str | Path, layout: SingleFileLayout) -> dict | None:
    """The component configs an exported file of ``layout`` carries, checked; ``None`` for other files."""
    metadata = read_metadata(path)
    raw = metadata.get(CONFIGS_KEY)
    if raw is None:
        return None

    def damaged(reason: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{path} has damaged model configs in its metadata ({CONFIGS_KEY}: {reason}): "
                                   f"export it again")

    # A file that names another layout's format would have its configs built by the wrong pipeline.
    written_as = metadata.get(FORMAT_KEY)
    if written_as is not None and written_as not in layout.formats:
        raise damaged(f"written as {written_as!r}, but its tensors are {layout.format!r}'s")
    try:
        configs = json.loads(raw)
    except ValueError as e:
        raise damaged(f"not JSON, {e}") from None
    names = (*(part.component for part in layout.components), layout.scheduler)
    if not isinstance(configs, dict) or not all(isinstance(configs.get(n), dict) for n in names):
        raise damaged(f"needs objects for {', '.join(names[:-1])} and {names[-1]}")
    # The configs choose which classes get built: only the layout's own ones, never whatever a file names.
    for part in layout.components:
        config = configs[part.component]
        if part.library == "transformers":
            if config.get("model_type") != part.model_type:
                raise damaged(f"{part.component} is {config.get('model_type')!r}, not {part.model_type}")
            config.pop("auto_map", None)  # never point transformers at code from a file
        elif config.get("_class_name") != part.class_name:
            raise damaged(f"{part.component} is {config.get('_class_name')!r}, not {part.class_name}")
    scheduler = configs[layout.scheduler].get("_class_name")
    if not _is_diffusers_scheduler(scheduler):
        raise damaged(f"{layout.scheduler} {scheduler!r} is not a diffusers scheduler")
    return configs


def tokenizer_options(path: str | Path, layout: SingleFileLayout) -> dict[str, dict[str, str]]:
    """Options for each tokenizer of a file of ``layout``: what the file records (files the studio
    exported), else the layout's reference ones. Only known special tokens, as short strings."""
    raw = read_metadata(path).get(TOKENIZERS_KEY)
    if raw is None:
        return {name: dict(options) for name, options in layout.tokenizer_options.items()}
    try:
        recorded = json.loads(raw)
    except ValueError:
        recorded = None
    if not (isinstance(recorded, dict) and set(recorded) <= set(layout.tokenizers) and all(
            isinstance(o, dict) and set(o) <= set(_TOKENIZER_OPTIONS)
            and all(isinstance(v, str) and 0 < len(v) <= 32 for v in o.values()) for o in recorded.values())):
        raise CorruptWeightsError(f"{path} has damaged tokenizer options in its metadata ({TOKENIZERS_KEY}): "
                                  f"export it again")
    return recorded


def _is_diffusers_scheduler(name) -> bool:
    import diffusers

    if not isinstance(name, str) or not name.isidentifier():
        return False
    cls = getattr(diffusers, name, None)
    return isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)


@contextlib.contextmanager
def single_file_config_dir(path: str | Path, layout: SingleFileLayout) -> Iterator[Path]:
    """A diffusers config folder for loading ``path``, a file of ``layout``, with ``from_single_file``.

    Files this module exported carry their configs: they are written to a temporary folder that
    lives while the ``with`` block runs. Other files get the layout's own ``config_dir``.
    """
    configs = embedded_configs(path, layout)
    if configs is None:
        yield Path(layout.config_dir)
        return
    tmp = Path(tempfile.mkdtemp(prefix="lora-studio-config-"))
    try:
        # model_index.json comes from the layout's own (it names the libraries and classes that get
        # imported); only the scheduler class is the file's, and it was checked above.
        index = json.loads((Path(layout.config_dir) / "model_index.json").read_text())
        index[layout.scheduler] = ["diffusers", configs[layout.scheduler]["_class_name"]]
        # Only switches the layout's own pipeline has, and only true/false: nothing that names code.
        options = configs.get(PIPELINE_OPTIONS)
        if isinstance(options, dict):
            index.update({k: v for k, v in options.items() if isinstance(v, bool) and isinstance(index.get(k), bool)})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        files = {part.component: MODEL_CONFIG_FILE for part in layout.components}
        files[layout.scheduler] = SCHEDULER_CONFIG_FILE
        for name, filename in files.items():
            (tmp / name).mkdir()
            (tmp / name / filename).write_text(json.dumps(configs[name], indent=2))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
