"""`python -m trainer CONFIG.toml` and `accelerate launch [--multi_gpu --num_processes N] -m trainer CONFIG.toml`."""

import os
import sys

from trainer.cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's teardown at interpreter exit aborts about one run in ten (SIGABRT after all work is
        # done); leaving without interpreter teardown avoids it (FIELD-NOTES.md).
        os._exit(code)
    sys.exit(code)
