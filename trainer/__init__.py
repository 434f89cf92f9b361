"""The accelerate-based LoRA trainer: configs, datasets, adapter methods and the training loop.

``config.py`` holds :class:`~trainer.config.TrainConfig` (TOML in and out, ``--set`` overrides);
``data.py`` reads datasets in every layout users bring and reports on them. Adapter methods
(``methods.py``) and the training loop (``loop.py``) come next. Importable without Streamlit or
torch; heavy dependencies are imported by the functions that need them.
"""
