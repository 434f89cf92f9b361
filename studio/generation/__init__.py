"""Generation: the one path from a prompt and an adapter stack to PNGs that carry their recipe.

- ``requests``: :class:`GenerationRequest` (the adapter stack as ``adapters.compose.AdapterSpec``
  entries) and its validation; the samplers by their A1111 names.
- ``run``: :func:`generate` / :func:`generate_with_pipeline`, the stack resolved, checked and applied
  under the pipeline's lock; img2img and inpainting pipelines on the same components.
- ``results``: the images a run returns, each saved as a PNG with its recipe.
- ``recipes``: the recipe chunks (A1111 ``parameters`` and the studio's JSON), read back from PNGs
  nobody vouches for, and what a recipe may cost before it needs a confirmation.
- ``inputs``: img2img/inpainting input images, stored and pinned by sha256, decoded within bounds.
- ``grid``: X/Y grids of ordinary requests drawn as one labelled PNG.
- ``prompt_tags``: A1111's ``<lora:NAME:W>`` prompt tags, resolved into the stack and written back.

Stands on ``adapters`` (the stack composed onto a pipeline) and ``core``; nothing here is imported by
this package's ``__init__``, so importing one module costs only what that module needs.
"""
