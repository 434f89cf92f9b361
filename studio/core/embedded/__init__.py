"""The embedded base models: real diffusers pipelines small enough to ship and run on CPU.

``tiny/`` holds the committed weights of ``tiny``, an SD-1 pipeline trained on procedural 32 px scenes.
The recipe that rebuilds it from a seed, the scene drawer and the quality and style checks are tools
of the app layer (``studio/app/tiny/``); this package holds only the weights and where they are.
"""

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
TINY_MODEL_DIR = EMBEDDED_DIR / "tiny"
TINY_NATIVE_RESOLUTION = 32
