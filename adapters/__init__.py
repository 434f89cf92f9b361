"""Adapters: the content-addressed store, the versioned registry, file formats and composition.

Importable without Streamlit; heavy dependencies are imported by the functions that need them.
"""
