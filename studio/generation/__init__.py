"""Generation: the one path from a prompt and an adapter stack to PNGs that carry their recipe.

Requests and their validation, recipes (PNG chunks in, replay out), input images pinned by hash, the
pipeline run, and X/Y grids. Stands on ``adapters`` (the stack composed onto a pipeline) and ``core``.
"""
