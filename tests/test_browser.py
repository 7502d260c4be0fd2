"""End-to-end: the RouterExplorer widget in a real JupyterLab, driven by headless Chromium.

For each notebook (the small fixture ``tests/browser/explorer_fixture.ipynb`` always, the real
``notebooks/03_router_schedules.ipynb`` once it exists) the test starts ``jupyter lab`` on
127.0.0.1 with a random port and token, opens the notebook in headless Chromium (Python
playwright, the system's /usr/bin/chromium: no ``playwright install``), runs all cells, then moves
the timestep slider and changes the block dropdown of the first RouterExplorer and checks that the
dashboard image changes each time and that no cell shows an error or an unrendered widget.
Screenshots go to ``tests/browser_screenshots/`` (git-ignored). Server and browser are always shut
down, also when the test fails.

Run alone with ``python -m pytest -q tests/test_browser.py -s``; ``-m "not browser"`` deselects it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the module-level skip below says why
    sync_playwright = None

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOTS = ROOT / "tests" / "browser_screenshots"
FIXTURE_NOTEBOOK = ROOT / "tests" / "browser" / "explorer_fixture.ipynb"
REAL_NOTEBOOK = ROOT / "notebooks" / "03_router_schedules.ipynb"

# Bounds for a busy 2-core machine (training runs share it). No wait below is unbounded.
SERVER_START_S = 120      # `jupyter lab` answers /api/status
PAGE_LOAD_S = 120         # JupyterLab's bundle loaded and the notebook panel shown
WIDGET_UPDATE_S = 60      # one redraw of the dashboard after a control changes
SERVER_STOP_S = 30

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None,
                       reason="the `playwright` Python module is missing (pip install -e '.[dev]')"),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)"),
]


@dataclass(frozen=True)
class NotebookCase:
    path: Path
    copy_to_tmp: bool   # serve a temporary copy (hermetic) or the notebook's own folder (relative paths)
    run_all_s: int      # bound on "Run All Cells"


CASES = [
    # The hermetic fixture is the slow variant: the real notebook 03 exercises the same explorer.
    pytest.param(NotebookCase(FIXTURE_NOTEBOOK, copy_to_tmp=True, run_all_s=180), id="explorer_fixture",
                 marks=pytest.mark.slow),
    pytest.param(NotebookCase(REAL_NOTEBOOK, copy_to_tmp=False, run_all_s=600), id="03_router_schedules",
                 marks=pytest.mark.skipif(not REAL_NOTEBOOK.exists(),
                                          reason=f"{REAL_NOTEBOOK.relative_to(ROOT)} does not exist yet "
                                                 "(needs trained checkpoints)")),
]


# --------------------------------------------------------------------------- JupyterLab server

@dataclass
class LabServer:
    url: str
    token: str
    root_dir: Path
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no server log>"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(server_url: str, token: str, path: str, method: str = "GET", timeout: float = 5):
    request = urllib.request.Request(f"{server_url}{path}", method=method,
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def _token_option() -> str:
    import jupyter_server

    # jupyter_server 2 moved the token to the IdentityProvider (ServerApp.token is deprecated there).
    major = int(jupyter_server.__version__.split(".")[0])
    return "--IdentityProvider.token" if major >= 2 else "--ServerApp.token"


def _lab_environment(home: Path) -> dict:
    """The server's (and so the kernel's) environment: isolated Jupyter config and lab settings."""
    env = dict(os.environ)
    # tests/conftest.py sets MPLBACKEND=Agg for pytest; the kernel needs ipykernel's inline backend,
    # otherwise display(figure) shows "<Figure size ...>" text instead of the PNG.
    env.pop("MPLBACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    # The venv's kernelspec and lab extensions stay found: they live under sys.prefix/share/jupyter.
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")]:
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    settings = {
        # No news/update toasts (no network here; a toast could cover the notebook).
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        # Never write the executed notebook back (the real notebook is served from the repo).
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        # Keep every cell in the DOM so all prompts and outputs can be inspected.
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    }
    for plugin, values in settings.items():
        path = home / "lab-settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return env


def _stop_server(server: LabServer) -> None:
    proc = server.process
    if proc.poll() is None:
        try:  # clean shutdown: the server stops its kernels too
            _api(server.url, server.token, "/api/shutdown", method="POST")
        except (urllib.error.URLError, OSError):
            pass
        try:
            proc.wait(SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    # Whatever is left of the process group we started (server, kernels): kill it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(10)


@pytest.fixture
def notebook_case(request) -> NotebookCase:
    return request.param


@pytest.fixture
def lab(notebook_case: NotebookCase, tmp_path: Path):
    """A `jupyter lab` serving the notebook's folder, started with this interpreter (the venv's)."""
    case = notebook_case
    if case.copy_to_tmp:
        root_dir = tmp_path / "notebooks"
        root_dir.mkdir()
        shutil.copy2(case.path, root_dir / case.path.name)
    else:
        root_dir = case.path.parent
    port, token = _free_port(), uuid.uuid4().hex
    url = f"http://127.0.0.1:{port}"
    env = _lab_environment(tmp_path / "jupyter-home")
    log_path = tmp_path / "jupyter-lab.log"
    # sys.executable is the venv's python under `make test`: the server then finds the `python3`
    # kernelspec that the Makefile installed with `ipykernel install --sys-prefix`, and that spec's
    # "python" argv resolves to this same interpreter.
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"{_token_option()}={token}", f"--ServerApp.root_dir={root_dir}",
           "--ServerApp.terminals_enabled=False",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(url, token, root_dir, process, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"jupyter lab exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if _api(url, token, "/api/status")[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer within {SERVER_START_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        kernelspecs = json.loads(_api(url, token, "/api/kernelspecs")[1])
        assert "python3" in kernelspecs["kernelspecs"], kernelspecs
        yield server
    finally:
        _stop_server(server)


# --------------------------------------------------------------------------- browser

@pytest.fixture(scope="module")
def browser():
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1300})
    try:
        page = context.new_page()
        page.set_default_timeout(WIDGET_UPDATE_S * 1000)
        page.console_errors = []
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(f"pageerror: {e}"))
        yield page
    finally:
        context.close()


# --------------------------------------------------------------------------- notebook helpers

def _wait_for_kernel(server: LabServer, notebook_name: str, timeout_s: float) -> dict:
    """The notebook's kernel, once the server reports it idle with a client (the page) connected."""
    deadline = time.monotonic() + timeout_s
    sessions = []
    while time.monotonic() < deadline:
        try:
            sessions = json.loads(_api(server.url, server.token, "/api/sessions")[1])
        except (urllib.error.URLError, OSError):
            sessions = []
        for session in sessions:
            kernel = session.get("kernel") or {}
            if (session.get("path", "").endswith(notebook_name) and kernel.get("execution_state") == "idle"
                    and kernel.get("connections", 0) >= 1):
                return kernel
        time.sleep(0.5)
    raise AssertionError(f"no idle, connected kernel for {notebook_name} within {timeout_s} s: {sessions}")


# Prompts of all code cells of the open notebook: "[3]:", "[*]:" (running/queued) or "[ ]:".
_PROMPTS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell .jp-InputArea-prompt'))
    .map(p => p.textContent.trim())"""


def _run_all_cells(page, timeout_s: float) -> list[str]:
    """Run > Run All Cells, then wait (bounded) until no cell is queued or running."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-content .lm-Menu-item").filter(
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))).click()
    deadline = time.monotonic() + timeout_s
    seen_running = False
    while True:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            text = dialog.first.inner_text()
            if "Select Kernel" not in text:
                raise AssertionError(f"unexpected dialog during Run All: {text!r}")
            # Should not happen once the kernel is connected; if JupyterLab still asks which kernel
            # to use, take its preselected choice (the notebook's "python3") and say so.
            print(f"[browser] JupyterLab asked for a kernel during Run All: {text!r}; accepting its choice")
            dialog.first.locator(".jp-Dialog-button.jp-mod-accept").click()
        prompts = page.evaluate(_PROMPTS_JS)
        running = any("*" in p for p in prompts)
        seen_running |= running
        all_done = bool(prompts) and all(re.fullmatch(r"\[\d+\]:?", p) for p in prompts)
        # A failing cell stops "Run All": the cells after it are left unnumbered, not running.
        started = seen_running or any(re.fullmatch(r"\[\d+\]:?", p) for p in prompts)
        if all_done or (started and not running):
            return prompts
        if time.monotonic() > deadline:
            raise AssertionError(f"cells still running after {timeout_s} s: prompts {prompts}")
        time.sleep(0.5)


def _notebook_problems(page) -> list[str]:
    """Errors visible in the notebook: tracebacks, widget errors, widgets shown as plain text."""
    problems = []
    outputs = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output")
    for i in range(outputs.count()):
        out = outputs.nth(i)
        mime = out.get_attribute("data-mime-type") or ""
        text = out.inner_text()
        if mime == "application/vnd.jupyter.stderr" and re.search(r"Traceback|^\w*(Error|Exception)\b", text, re.M):
            problems.append(f"error output: {text[:1500]}")
        if mime != "application/vnd.jupyter.widget-view+json" and re.search(
                r"^\s*(VBox|HBox|IntSlider|Dropdown|Output|Label)\(|<dydit_lab\.(?:viz\.)?widgets\.\w+ object", text):
            problems.append(f"widget shown as text (not rendered): {text[:300]}")
    output_text = "\n".join(page.locator(
        ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea").all_inner_texts())
    for marker in ("Error displaying widget", "Error rendering output", "Traceback (most recent call last)"):
        if marker in output_text:
            problems.append(f"an output shows {marker!r}")
    return problems


def _shot(page, locator, name: str) -> bytes:
    """Screenshot of the explorer (returned) and of the whole page, both saved."""
    page.screenshot(path=str(SCREENSHOTS / f"{name}-page.png"))
    return locator.screenshot(path=str(SCREENSHOTS / f"{name}.png"), animations="disabled")


def _selected_label(select) -> str:
    return select.evaluate("el => el.options[el.selectedIndex].text")


# --------------------------------------------------------------------------- the test

@pytest.mark.parametrize("notebook_case", CASES, indirect=True)
def test_router_explorer_in_jupyterlab(notebook_case, lab, page):
    case, name = notebook_case, notebook_case.path.stem
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob(f"{name}-*.png"):
        old.unlink()
    started = time.monotonic()

    def log(msg):
        print(f"[browser {name} {time.monotonic() - started:6.1f}s] {msg}")

    try:
        page.goto(f"{lab.url}/lab/tree/{case.path.name}?token={lab.token}",
                  wait_until="domcontentloaded", timeout=PAGE_LOAD_S * 1000)
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        expect(panel.locator(".jp-Notebook .jp-Cell").first).to_be_visible(timeout=PAGE_LOAD_S * 1000)
        # The toolbar says "idle" before the kernel exists (then "connecting"): ask the server instead
        # for the notebook's kernel, idle with the page's websocket connected; then the page agrees.
        kernel = _wait_for_kernel(lab, case.path.name, PAGE_LOAD_S)
        expect(panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(
            1, timeout=PAGE_LOAD_S * 1000)
        log(f"notebook open, kernel {kernel['name']} idle")

        prompts = _run_all_cells(page, case.run_all_s)
        log(f"cells ran: prompts {prompts}")
        problems = _notebook_problems(page)
        assert not problems, "\n".join(problems)
        assert all(re.fullmatch(r"\[\d+\]:?", p) for p in prompts), f"not every cell ran: {prompts}"

        # The first RouterExplorer: a VBox with the "step" slider and the Output holding the dashboard.
        explorer = page.locator(".jp-OutputArea-output .widget-vbox").filter(
            has=page.locator(".widget-slider", has_text="step")).filter(
            has=page.locator(".widget-output")).first
        image = explorer.locator(".widget-output img").first
        expect(image).to_be_visible(timeout=WIDGET_UPDATE_S * 1000)
        expect(page.get_by_text("Loading widget...")).to_have_count(0)
        readout = explorer.locator(".widget-slider .widget-readout").first
        t_label = explorer.locator(".widget-hbox .widget-label").filter(has_text=re.compile(r"^t = ")).first
        src_before, t_before, step_before = image.get_attribute("src"), t_label.inner_text(), readout.inner_text()
        assert src_before.startswith("data:image/png"), src_before[:80]
        shot_before = _shot(page, explorer, f"{name}-1-before")
        log(f"widget rendered: step {step_before}, {t_before}")

        # Timestep slider: keyboard on the noUiSlider handle (one step right, or left at the end).
        handle = explorer.locator(".widget-slider .noUi-handle").first
        handle.focus()
        at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
        step_after = str(int(step_before) + (-1 if at_max else 1))
        expect(readout).to_have_text(step_after, timeout=WIDGET_UPDATE_S * 1000)
        expect(t_label).not_to_have_text(t_before, timeout=WIDGET_UPDATE_S * 1000)
        expect(image).not_to_have_attribute("src", src_before, timeout=WIDGET_UPDATE_S * 1000)
        expect(image).to_be_visible()
        src_step = image.get_attribute("src")
        shot_step = _shot(page, explorer, f"{name}-2-step")
        log(f"slider moved: step {step_after}, {t_label.inner_text()}")

        # Block dropdown: pick another block.
        select = explorer.locator(".widget-dropdown").filter(
            has=page.locator("label", has_text=re.compile(r"^\s*block\s*$"))).locator("select")
        labels = select.locator("option").all_inner_texts()
        current = _selected_label(select)
        others = [label for label in labels if label != current]
        assert others, f"only one block to choose from: {labels}"
        select.select_option(label=others[0])
        expect(image).not_to_have_attribute("src", src_step, timeout=WIDGET_UPDATE_S * 1000)
        expect(image).to_be_visible()
        assert _selected_label(select) == others[0]
        shot_block = _shot(page, explorer, f"{name}-3-block")
        log(f"block changed: {current} -> {others[0]}")

        assert image.get_attribute("src") not in (src_before, src_step)
        assert len({shot_before, shot_step, shot_block}) == 3, "the screenshots of the explorer did not change"
        assert t_label.inner_text() != t_before

        problems = _notebook_problems(page)
        assert not problems, "\n".join(problems)
        widget_errors = [m for m in page.console_errors if re.search(r"widget", m, re.I)]
        assert not widget_errors, f"widget errors in the browser console: {widget_errors}"
        log(f"done; other console errors: {page.console_errors or 'none'}")
    except (AssertionError, PlaywrightError) as exc:
        try:
            page.screenshot(path=str(SCREENSHOTS / f"{name}-failure.png"))
        except PlaywrightError:
            pass
        raise AssertionError(f"{exc}\n--- browser console errors ---\n{page.console_errors}\n"
                             f"--- jupyter lab log (tail) ---\n{lab.log_tail()}") from exc
