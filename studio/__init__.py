"""LoRA Studio's library, in layers that import only downward (``lint-imports`` holds the contract):

    studio/app/         the lora-studio command, the Streamlit pages, jobs, Hub publish/pull, tools
    trainer/            configs, datasets, adapter methods, the training loop      (top-level package)
    studio/generation/  requests, recipes, input images, the pipeline run, grids
    adapters/           the blob store, the registry, file formats, ingest, composition, merges (top-level)
    studio/core/        errors, settings, atomic writes, file safety, hashing, families, base models
"""
