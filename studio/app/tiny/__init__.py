"""Tools around the embedded tiny model: the recipe that builds it from a seed (``build.py``), the
procedural scenes it learns (``scenes.py``), its tokenizer conversion, the sample style datasets, and the
prompt-following (``quality.py``) and style (``style.py``) measurements. Its weights live in
``studio/core/embedded/``.
"""
