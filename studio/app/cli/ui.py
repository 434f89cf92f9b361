"""``lora-studio ui``: start the Streamlit studio (app_streamlit.py) in place of this process."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from studio.app.cli.common import whole_number
from studio.app.cli.output import print_warning
from studio.core.errors import InvalidRequestError, StudioError
from studio.core.settings import PROJECT_ROOT

# Uploads up to 2048 MB: a dataset zip may expand to 2 GiB (studio.app.dataset_files.MAX_EXPANDED_BYTES)
# and an SDXL LoRA file is up to ~1.7 GB. Streamlit keeps an upload in the server's memory.
UI_MAX_UPLOAD_MB = 2048


def register(sub) -> None:
    """Add ``ui`` to the ``lora-studio`` subcommands."""
    p = sub.add_parser("ui", help="start the Streamlit studio (binds 127.0.0.1 unless --address is given)")
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                          "another address needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow an address other machines can reach; the studio has no login, so prefer an SSH "
                        "tunnel or an authenticating reverse proxy (README: 'Behind a login')")
    p.add_argument("--port", type=whole_number, default=8501)
    p.add_argument("--headless", action="store_true", help="never open a browser (the default unless --browser)")
    p.add_argument("--browser", action="store_true", help="open the studio in this machine's web browser")
    p.set_defaults(func=cmd_ui)


def app_path() -> Path:
    """The Streamlit entrypoint at the project's top level."""
    return PROJECT_ROOT / "app_streamlit.py"


def _is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost); a host name
    other than localhost may resolve to anything, so it counts as remote."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_ui(args) -> int:
    app = app_path()
    if not app.exists():
        raise StudioError(f"{app} is missing: install the studio from its source folder (pip install -e .)")
    if not _is_loopback(args.address):
        if not args.allow_remote:
            raise InvalidRequestError(
                f"--address {args.address} lets other machines open the studio, which has no login: keep "
                f"127.0.0.1 and use an SSH tunnel or an authenticating reverse proxy (README: 'Behind a login'), "
                f"or pass --allow-remote")
        print_warning(f"the studio listens on {args.address}:{args.port} with no login: anyone who reaches it can "
                      f"generate, train and read and write the data roots; put it behind an SSH tunnel or an "
                      f"authenticating reverse proxy (README: 'Behind a login')")
    argv = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", args.address,
        "--server.port", str(args.port),
        "--browser.gatherUsageStats", "false",
        # No file watcher: it walks the whole project tree (inotify overflows) and reruns pages
        # when files change; a studio is not a development server.
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",
        # Visitors see the pages' own one-line errors; an uncaught exception shows a generic message,
        # its traceback goes to this console only ("false" would still show tracebacks).
        "--client.showErrorDetails", "none",
        "--server.maxUploadSize", str(UI_MAX_UPLOAD_MB),
        # No full garbage collection after every script run: with torch, diffusers and transformers
        # loaded one gc.collect(2) walks ~0.5 M objects in ~0.45 s holding the GIL, and the Generate
        # page's progress fragment reruns twice a second, so the generation queue's worker thread
        # waited for the GIL between ops: 25 s a denoising step instead of under 0.1 s.
        "--runner.postScriptGC", "false",
    ]
    # Headless unless asked: no browser launch and no first-run e-mail prompt on a server.
    argv += ["--server.headless", "false" if args.browser and not args.headless else "true"]
    os.execv(sys.executable, argv)  # replace this process: Ctrl+C reaches Streamlit directly
    return 0  # pragma: no cover
