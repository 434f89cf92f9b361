"""The top floor: the faces users touch and the tools around them.

The ``lora-studio`` command, the Streamlit pages (``ui/``), the background job queue, Hub publish and
pull, dataset uploads, disk clean-up, and the embedded models' build, quality and style tools
(``tiny/``). Everything here calls the library below; nothing below imports from here.
"""
