"""mergesmith studio end to end in a real headless browser: Debian's Chromium driven by
playwright (which downloads nothing: ``executable_path``). The studio runs in a uvicorn
server thread on a free port; merges run in its worker subprocesses. Every wait is for
page content, never a sleep. Screenshots of the main views are checked for non-blank
content and kept in tests/artifacts/studio/."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MERGESMITH_CHROMIUM", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)
pytest.importorskip("playwright")
pytest.importorskip("uvicorn")

from conftest import run_cli  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402
from studio_common import build_models, folder_bytes, slices, task_arithmetic  # noqa: E402

from mergesmith.studio import StudioConfig, create_app  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "studio"
TIMEOUT = 90_000  # ms: generous, for slow CI machines; the waits end as soon as text shows
expect.set_options(timeout=TIMEOUT)  # expect's own default is 5 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("studio")
    saved = os.environ.get("MERGESMITH_EVAL_CACHE")
    os.environ["MERGESMITH_EVAL_CACHE"] = str(root / "eval-cache")  # a fresh eval cache
    models = build_models(root / "work")
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("secret")
    config = StudioConfig(workdir=str(root / "work"), port=free_port())
    app = create_app(config)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port,
                                        log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    started = threading.Event()

    def poll() -> None:
        while not srv.started and thread.is_alive():
            threading.Event().wait(0.02)
        started.set()

    threading.Thread(target=poll, daemon=True).start()
    assert started.wait(60) and srv.started, "the studio server did not start"
    yield {"url": f"http://127.0.0.1:{config.port}", "root": root, "models": models,
           "config": config}
    srv.should_exit = True
    thread.join(10)
    if saved is None:
        os.environ.pop("MERGESMITH_EVAL_CACHE", None)
    else:
        os.environ["MERGESMITH_EVAL_CACHE"] = saved


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server["url"] + "/")
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    context.close()
    assert not errors, errors  # no JavaScript errors on the page


def set_recipe(page, text: str) -> None:
    page.evaluate("t => document.querySelector('.CodeMirror').CodeMirror.setValue(t)", text)


def screenshot(page, name: str) -> Path:
    """Save a screenshot and check it is not blank: many distinct colours."""
    from PIL import Image

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert img.width >= 800 and img.height >= 400
    assert colours is not None and len(colours) > 100, f"{name}: looks blank"
    top = max(c for c, _ in colours)
    assert top < 0.97 * img.width * img.height, f"{name}: one colour fills the page"
    return path


def test_typo_shows_the_error_at_its_line(page, server):
    expect(page.locator("#template option")).to_have_count(6)  # 5 templates + the prompt
    page.select_option("#template", "task_arithmetic")
    expect(page.locator("#check-ok")).to_be_visible()
    set_recipe(page, task_arithmetic(server["models"]).replace(
        "weight: 0.3", "wieght: 0.3"))
    page.click("#check")
    expect(page.locator("#error-where")).to_contain_text("line 7")
    expect(page.locator("#error-field")).to_have_text("models[1].parameters.wieght")
    expect(page.locator("#check-error")).to_contain_text("Did you mean 'weight'?")
    marked = page.evaluate("document.querySelector('.CodeMirror').CodeMirror"
                           ".lineInfo(6).bgClass")
    assert "cm-error-line" in marked
    expect(page.locator(".cm-error-line")).to_have_count(1)
    screenshot(page, "editor-error")
    # live checking: fixing the typo clears the error without pressing Check
    page.evaluate("""() => { const cm = document.querySelector('.CodeMirror').CodeMirror;
        cm.setValue(cm.getValue().replace('wieght', 'weight')); }""")
    expect(page.locator("#check-ok")).to_be_visible()
    expect(page.locator(".cm-error-line")).to_have_count(0)


def test_slices_recipe_shows_the_layer_map(page, server):
    set_recipe(page, slices(server["models"]))
    page.click("#check")
    expect(page.locator("#layer-map")).to_be_visible()
    lines = page.locator(".layer-map-lines")
    expect(lines).to_contain_text(f"0-1 ← {server['models']['ft_a']} [0-1]")
    expect(lines).to_contain_text(f"2-3 ← {server['models']['ft_b']} [1-2]")
    expect(page.locator("#layer-map svg rect").first).to_be_visible()
    expect(page.locator("#check-result")).to_contain_text("output tensors")
    page.select_option("#method-select", "passthrough")
    expect(page.locator("#method-doc")).not_to_be_empty()
    screenshot(page, "editor-plan")


def test_merge_runs_to_done_and_equals_mergesmith_run(page, server, tmp_path):
    recipe = task_arithmetic(server["models"])
    set_recipe(page, recipe)
    page.click("#merge")
    expect(page.locator("#run-status")).to_have_text("done", timeout=TIMEOUT)
    out = Path(page.locator("#run-out").inner_text())
    expect(page.locator("#run-checksums")).to_contain_text("sha256")
    expect(page.locator("#run-numbers")).to_contain_text("30/30 tensors")
    expect(page.locator("#runs-table")).to_contain_text("done")
    models = server["models"]
    expect(page.locator("#eval-parents")).to_have_value(
        "\n".join(str(models[k]) for k in ("base", "ft_a", "ft_b")))
    page.fill("#eval-text", "eval.txt")
    page.click("#eval-run")
    expect(page.locator("#eval-table")).to_contain_text("perplexity")
    expect(page.locator("#eval-table tr")).to_have_count(5)  # header, the merge, 3 parents
    expect(page.locator("#eval-result svg rect")).to_have_count(4)
    screenshot(page, "run-done")
    (tmp_path / "recipe.yml").write_text(recipe)
    (tmp_path / "cli").mkdir()
    done = run_cli("run", str(tmp_path / "recipe.yml"), str(tmp_path / "cli" / "merged"), "-q")
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == folder_bytes(tmp_path / "cli" / "merged")


def test_cancel_leaves_no_published_output(page, server, monkeypatch):
    monkeypatch.setenv("MERGESMITH_STUDIO_ITEM_DELAY", "0.5")  # slow enough to cancel
    set_recipe(page, task_arithmetic(server["models"]))
    page.click("#merge")
    page.wait_for_function("""() => { const e = document.querySelector('#run-numbers');
        return e && /\\b[1-9]\\d*\\/30 tensors/.test(e.textContent); }""")
    page.click("#run-cancel")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(page.locator("#run-error")).to_contain_text("nothing was published")
    run_id = page.locator("#runs-table tr.sel td").first.inner_text()
    out = server["root"] / "work" / "runs" / run_id / "merged"
    assert not out.exists()
    assert Path(str(out) + ".partial").is_dir()
    monkeypatch.delenv("MERGESMITH_STUDIO_ITEM_DELAY")
    page.click("#run-resume")
    expect(page.locator("#run-status")).to_have_text("done")
    assert out.is_dir() and not Path(str(out) + ".partial").exists()


def test_outside_files_refused_and_other_views(page, server):
    url = server["url"]
    for path in ("/etc/passwd", str(server["root"] / "outside" / "secret.txt"),
                 "../outside/secret.txt"):
        r = page.request.get(f"{url}/api/file", params={"path": path})
        assert r.status == 403, (path, r.text())
        status = page.evaluate("p => fetch('/api/file?path=' + encodeURIComponent(p))"
                               ".then(r => r.status)", path)
        assert status == 403
    r = page.request.get(f"{url}/api/info", headers={"origin": "http://evil.example"})
    assert r.status == 403
    page.click("#tab-models")
    page.locator("#models-table tr", has_text="models/ft_a").locator("td").first.click()
    expect(page.locator("#model-summary")).to_contain_text("LlamaForCausalLM")
    screenshot(page, "models")
    page.click("#tab-inspect")
    page.select_option("#inspect-base", str(server["models"]["base"]))
    page.click("#inspect-run")
    expect(page.locator("#inspect-report img").first).to_be_visible()
    page.wait_for_function("""() => [...document.querySelectorAll('#inspect-report img')]
        .every(i => i.complete && i.naturalWidth > 0)""")
    screenshot(page, "inspect")


@pytest.fixture(scope="module", autouse=True)
def _clean_artifacts():
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    yield
