"""The embedded tiny base model: a real diffusers SD-1 pipeline small enough to ship and run on CPU.

``model/`` holds the committed weights; ``build.py`` is the recipe that rebuilds them from a seed;
``scenes.py`` draws the scenes it was trained on (and the sample style datasets) and grades images;
``quality.py`` measures how well prompts control the generated images.
"""

from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent / "model"
TINY_NATIVE_RESOLUTION = 32
