"""``python -m studio.app.cli``: the same command as ``lora-studio``."""

import sys

from studio.app.cli import main

sys.exit(main())
