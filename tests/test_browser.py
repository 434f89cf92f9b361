"""End to end in a real browser: start the studio as a user would, generate from the Generate page.

Needs Chromium at /usr/bin/chromium (Debian: ``apt-get install chromium``) and the ``playwright``
Python package (the ``test`` extra); never ``playwright install``. Skipped when either is missing.
``LORA_STUDIO_E2E_BASE`` picks the base model typed into the page (default ``tiny``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
BASE_MODEL = os.environ.get("LORA_STUDIO_E2E_BASE", "tiny")
SERVER_START_TIMEOUT_S = 60
GENERATE_TIMEOUT_S = 300  # two images with a two-adapter stack; generous for a loaded CI machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the server and anything it started (it runs in its own session / process group)."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the studio exited with {proc.returncode} before answering:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"the studio did not answer {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _listening_addresses(port: int, pid: int) -> list[tuple[str, bool]]:
    """(local address, owned by pid) for every TCP socket listening on ``port``, from /proc/net/tcp{,6}."""
    owned: set[str] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owned.add(target[8:-1])
    except OSError:
        pass
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            addr_hex, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A = TCP_LISTEN
                found.append((_decode_addr(addr_hex), inode in owned))
    return found


def _decode_addr(addr_hex: str) -> str:
    # /proc/net/tcp{,6} print the address as 32-bit words in host byte order (little-endian here).
    raw = b"".join(bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, len(addr_hex), 8))
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    return socket.inet_ntop(socket.AF_INET6, raw)


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1") or addr.startswith("::ffff:127.")


def _non_loopback_ipv4() -> str | None:
    """This machine's outward IPv4 address, if it has one (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@pytest.fixture
def studio_server(tmp_path):
    """``python -m studio.app.cli ui --headless --port P`` with a private home; yields (url, port, pid)."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", LORA_STUDIO_HOME=str(tmp_path / "home"))
    if Path(BASE_MODEL).expanduser().exists():  # a local base typed into the page must lie under a data root
        env["LORA_STUDIO_DATA_ROOTS"] = str(Path(BASE_MODEL).expanduser().resolve().parent)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "studio.app.cli", "ui", "--headless", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(proc, url, log)
        yield url, port, proc.pid
    finally:
        _kill_group(proc)


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_generate_in_a_real_browser(browser, studio_server, tmp_path):
    url, port, pid = studio_server

    # Bound to loopback only: every listener on the port is 127.0.0.1 (or ::1), and one is the server's.
    listeners = _listening_addresses(port, pid)
    if listeners:
        assert all(_is_loopback(addr) for addr, _ in listeners), f"studio listens beyond loopback: {listeners}"
        assert any(mine for _, mine in listeners), f"no listener on port {port} belongs to the studio: {listeners}"
    outward = _non_loopback_ipv4()
    if outward is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            assert s.connect_ex((outward, port)) != 0, f"the studio answers on {outward}:{port}"
    if not listeners and outward is None:
        pytest.fail("could not check the bind address: no /proc/net/tcp and no outward address")

    # A second browser session takes the queue first with a long request: the first page's request then
    # waits behind it, and says so, until the other cancels.
    other = browser.new_page(viewport={"width": 1280, "height": 1400})
    other.goto(url, wait_until="domcontentloaded", timeout=30_000)
    other.locator('[data-testid="stTextArea"] textarea').first.wait_for(timeout=30_000)
    for label, value in (("Steps", "150"), ("Images", "1"), ("Width (0 = native)", "128"),
                         ("Height (0 = native)", "128")):
        other.locator(f'[data-testid="stNumberInput"] input[aria-label="{label}"]').fill(value)
    other.locator('[data-testid="stFormSubmitButton"] button').filter(has_text="Generate").click()
    other.wait_for_function("() => /Running/.test(document.body.innerText) && /step [1-9]/.test("
                            "document.body.innerText)", timeout=GENERATE_TIMEOUT_S * 1000)
    assert other.locator('[data-testid="stProgress"]').count() == 1  # one bar per image

    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    shot = tmp_path / "generate.png"
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=30_000)
        page.wait_for_selector('[data-testid="stApp"]', timeout=30_000)
        prompt = page.locator('[data-testid="stTextArea"] textarea').first
        prompt.wait_for(timeout=30_000)
        prompt.fill("a yellow triangle on a green background")
        seed = page.locator('[data-testid="stTextInput"] input[aria-label="Seed"]')
        seed.fill("7")
        if BASE_MODEL != "tiny":
            page.locator('[data-testid="stTextInput"] input[aria-label="Base model"]').fill(BASE_MODEL)
        page.locator('[data-testid="stFormSubmitButton"] button, [data-testid="stButton"] button').filter(
            has_text="Generate").first.click()
        page.wait_for_selector("text=Queued (next)", timeout=60_000)
        page.wait_for_function(  # a waiting bar for each of its two images
            """() => document.querySelectorAll('[data-testid="stProgress"]').length === 2""", timeout=30_000)
        _shot(page, "generate_queued")
        other.locator('[data-testid="stButton"] button').filter(has_text="Cancel").click()
        other.wait_for_selector("text=cancelled: 1 image(s)", timeout=GENERATE_TIMEOUT_S * 1000)

        page.wait_for_selector('[data-testid="stAlertContentSuccess"], [data-testid="stAlertContentError"], '
                               '[data-testid="stException"]', timeout=GENERATE_TIMEOUT_S * 1000)
        errors = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
        assert errors.count() == 0, f"the page shows an error: {errors.first.inner_text()}"
        success = page.locator('[data-testid="stAlertContentSuccess"]').first.inner_text()
        assert "image(s)" in success and "seed 7" in success, success

        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-testid="stImage"] img')]
                     .some(img => img.complete && img.naturalWidth > 0)""",
            timeout=30_000,
        )
        page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=30_000)
        images = page.locator('[data-testid="stImage"] img')
        assert images.count() >= 1
    finally:
        page.screenshot(path=str(shot), full_page=True)
        page.close()
        other.close()
    assert shot.stat().st_size > 0


E2E_TRAIN_TIMEOUT_S = 300
DOCS = Path(__file__).resolve().parent.parent / "docs"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _shot(page, name: str) -> Path:
    """A full-page screenshot kept as a test artefact (tests/artifacts, ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _idle(page, timeout_ms=60_000) -> None:
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=timeout_ms)


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the Streamlit selectbox labelled ``label``."""
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
    box.click()
    page.get_by_role("option", name=option).first.click()
    _idle(page)


# Every kind of Streamlit input widget, by its test id (a checkbox and a toggle are both stCheckbox).
INPUT_TESTIDS = ("stTextInput", "stNumberInput", "stSelectbox", "stMultiSelect", "stRadio", "stSlider",
                 "stSelectSlider", "stCheckbox", "stTextArea", "stDateInput", "stTimeInput", "stColorPicker",
                 "stFileUploader")


def _visible_inputs(page) -> int:
    """How many input widgets a user sees now (a closed expander's are in the page but not shown)."""
    # Streamlit draws a placeholder (stSkeleton) until a widget's code has loaded: wait for the real ones.
    page.wait_for_function("""() => ![...document.querySelectorAll('[data-testid="stSkeleton"]')]
                                     .some(el => el.checkVisibility())""", timeout=30_000)
    selector = ", ".join(f'[data-testid="{t}"]' for t in INPUT_TESTIDS)
    return page.evaluate(f"""() => [...document.querySelectorAll('{selector}')]
                                   .filter(el => el.checkVisibility()).length""")


def _train_quick(page, url: str) -> None:
    """The newcomer's path on the Train page: the striped sample, the quick preset, Start; nothing typed."""
    page.goto(f"{url}/train", wait_until="domcontentloaded", timeout=30_000)
    page.wait_for_selector('[data-testid="stApp"]', timeout=30_000)
    start = page.locator('[data-testid="stFormSubmitButton"] button').filter(has_text="Start training")
    start.wait_for(timeout=60_000)
    _idle(page)
    _choose(page, "Dataset", "sample: striped")
    page.wait_for_selector('text=images in', timeout=30_000)
    page.locator('[data-testid="stRadio"]').get_by_text("quick", exact=True).click()
    _idle(page)
    start.click()
    page.wait_for_selector('text=queued job', timeout=60_000)


def test_train_catalog_stack_generate_end_to_end(browser, studio_server, tmp_path):
    """The issue's journey: a newcomer opens the Train page (at most 12 inputs before Advanced), picks the
    striped sample and the quick preset and presses Start, nothing else; finds the adapter in the catalog,
    stacks it with a second adapter at chosen strengths on the Generate page, generates, and reads both in
    the recipe."""
    import shutil

    from ui_support import register, save_lora

    from adapters.registry import Registry

    url, _port, _pid = studio_server
    with Registry(home=tmp_path / "home") as reg:  # the second adapter, already in the catalog
        register(reg, "other", save_lora(tmp_path / "lora", seed=3), trigger_words=["zkother"])

    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    shots = {}
    try:
        # -- Train: essentials first, then the newcomer's quick run on a sample dataset --
        page.goto(f"{url}/train", wait_until="domcontentloaded", timeout=30_000)
        page.locator('[data-testid="stFormSubmitButton"] button').filter(has_text="Start training").wait_for(
            timeout=60_000)
        _idle(page)
        before = _visible_inputs(page)
        assert 5 <= before <= 12, f"{before} inputs before Advanced"
        page.locator('[data-testid="stExpander"] summary').filter(has_text="Advanced").click()
        page.locator('[data-testid="stExpander"]').filter(has_text="Advanced").locator(
            'text=dataset.caption_dropout_rate').wait_for(timeout=10_000)  # option names shown beside labels
        assert _visible_inputs(page) > before
        _shot(page, "train_advanced")
        _train_quick(page, url)
        page.wait_for_selector('[data-testid="stProgress"]', timeout=120_000)
        page.wait_for_function("() => /step [1-9]/.test(document.body.innerText)", timeout=120_000)
        shots["train"] = _shot(page, "train_running")
        page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("registered striped@1")',
                               timeout=E2E_TRAIN_TIMEOUT_S * 1000)
        # its checkpoints, the best starred (a data grid draws on a canvas: its cells are in the DOM, hidden)
        page.wait_for_selector("text=lowest validation loss", state="attached", timeout=30_000)
        shots["train_done"] = _shot(page, "train_done")

        # -- Adapters: the new adapter is in the catalog --
        page.goto(f"{url}/adapters", wait_until="domcontentloaded")
        page.wait_for_selector('text=striped', timeout=60_000)
        assert page.locator('[data-testid="stMarkdownContainer"]').filter(has_text="striped").count() >= 1
        shots["adapters"] = _shot(page, "adapters")

        # -- Generate: stack striped@1 at 0.8 with other@1 at 1.0 --
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-testid="stTextArea"] textarea').first.wait_for(timeout=60_000)
        for ref in ("striped@1", "other@1"):
            _choose(page, "Adapter", ref)
            page.locator('[data-testid="stButton"] button').filter(has_text="Add").first.click()
            _idle(page)
        slider = page.get_by_role("slider").first
        slider.focus()
        for _ in range(4):  # 1.0 -> 0.8 in steps of 0.05
            slider.press("ArrowLeft")
        _idle(page)
        page.locator('[data-testid="stTextInput"] input[aria-label="Seed"]').fill("5")
        page.locator('[data-testid="stFormSubmitButton"] button').filter(has_text="Generate").click()
        page.wait_for_selector('[data-testid="stAlertContentSuccess"], [data-testid="stAlertContentError"], '
                               '[data-testid="stException"]', timeout=GENERATE_TIMEOUT_S * 1000)
        errors = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
        assert errors.count() == 0, f"the page shows an error: {errors.first.inner_text()}"
        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-testid="stImage"] img')]
                     .some(img => img.complete && img.naturalWidth > 0)""", timeout=30_000)
        _idle(page)
        page.locator('[data-testid="stExpander"] summary').filter(has_text="Recipe").first.click()
        recipe = page.locator('[data-testid="stExpander"]').filter(has_text="Recipe").first
        recipe.locator('text=Adapters:').wait_for(timeout=10_000)
        text = recipe.inner_text()
        assert "striped@1:0.8" in text and "other@1:1" in text, text
        assert "Lora hashes" in text and "striped:" in text and "other:" in text, text
        shots["generate"] = _shot(page, "generate")
    finally:
        _shot(page, "last")
        page.close()
    # The README shows the Generate page and the Train page during a run.
    DOCS.mkdir(exist_ok=True)
    shutil.copyfile(shots["generate"], DOCS / "generate_page.png")
    shutil.copyfile(shots["train"], DOCS / "train_page.png")
