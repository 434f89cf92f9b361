"""The accelerate-based LoRA trainer: configs, datasets, adapter methods and the training loop.

Importable without Streamlit; heavy dependencies are imported by the functions that need them.
"""
