"""Studio page times: start-up of ``lora-studio ui``, and each page with a 10,000-version catalog vs a small one.

Two measurements, side by side in one run:

- start-up: ``lora-studio ui --headless`` launched as a user would; the time until the server answers
  HTTP 200, and (when playwright and /usr/bin/chromium are present) until the Generate page's title
  is drawn in a headless Chromium;
- pages: one full script run of each page (Streamlit's AppTest, in process) against a registry of
  ``--versions`` versions (filled with ``benchmarks/registry_scale.fill``) and against one of
  ``--small`` versions; the ratio large / small says whether a page's cost grows with the catalog
  (paged queries: it should stay near 1).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ui_pages.py [--versions 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(home: Path) -> tuple[float, float | None]:
    """Seconds from launching ``lora-studio ui`` to HTTP 200, and to the Generate title in Chromium."""
    port = _free_port()
    env = dict(os.environ, LORA_STUDIO_HOME=str(home), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "studio.app.cli", "ui", "--headless", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        http_s = time.perf_counter() - t0
        page_s = None
        if Path("/usr/bin/chromium").exists():
            try:
                from playwright.sync_api import sync_playwright
            except ImportError:
                return http_s, None
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                            args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector('h1:has-text("Generate")', timeout=120_000)
                page_s = time.perf_counter() - t0
                browser.close()
        return http_s, page_s
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def page_ms(script: str, repeats: int, setup=None) -> float:
    from streamlit.testing.v1 import AppTest

    times = []
    for _ in range(repeats):
        at = AppTest.from_file(str(ROOT / script), default_timeout=300)
        if setup:
            setup(at)
        t = time.perf_counter()
        at.run()
        times.append((time.perf_counter() - t) * 1000)
        assert not at.exception, at.exception
    return statistics.median(times)


def pages(home: Path, n_versions: int, repeats: int) -> dict[str, float]:
    from registry_scale import fill

    from adapters.registry import Registry
    from studio.core.settings import reload_settings

    os.environ["LORA_STUDIO_HOME"] = str(home)
    reload_settings()
    with Registry(home=home) as reg:
        fill(reg, n_versions)
        name = reg.list_versions(limit=1).items[0].name

    def detail(at):
        at.session_state["ad_open"] = name

    def search(at):
        at.session_state["ad_search"] = "soft"

    return {
        "Adapters: catalog page 1": page_ms("studio/app/ui/adapters_page.py", repeats),
        "Adapters: text search": page_ms("studio/app/ui/adapters_page.py", repeats, search),
        "Adapters: one adapter": page_ms("studio/app/ui/adapters_page.py", repeats, detail),
        "Generate (stack picker)": page_ms("studio/app/ui/generate_page.py", repeats),
        "Train": page_ms("studio/app/ui/train_page.py", repeats),
        "Datasets": page_ms("studio/app/ui/datasets_page.py", repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-startup", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-studio-ui-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_startup:
            http_s, page_s = startup(tmp / "start")
            print(f"lora-studio ui -> HTTP 200: {http_s:.2f} s"
                  + (f"; -> Generate page drawn in Chromium: {page_s:.2f} s" if page_s is not None else ""))
        small = pages(tmp / "small", args.small, args.repeats)
        large = pages(tmp / "large", args.versions, args.repeats)
    print(f"{'page (median of ' + str(args.repeats) + ' script runs)':<40}{args.small:>10} v{args.versions:>10} v"
          f"{'ratio':>8}")
    for key in small:
        print(f"{key:<40}{small[key]:>9.0f}ms{large[key]:>9.0f}ms{large[key] / small[key]:>8.2f}")


if __name__ == "__main__":
    main()
