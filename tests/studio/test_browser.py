"""The studio in a real headless browser (the system's Chromium through Playwright) on the CPU with a tiny model:
a bad data line reported, trained tokens highlighted, the estimate following the batch size, a short run whose loss
curve updates, stopped, resumed and finished, a question asked, an export. A screenshot of each page is written to
$STUDIO_SCREENSHOTS (scripts/studio_browser.sh sets docs/studio) or the test's temp folder.

Skipped, saying why, without Playwright or a Chromium (`scripts/studio_browser.sh` installs both: the Debian
package and pip's playwright; Playwright's own browser downloads are not used)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from studio_client import bad_data, tiny_form

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    given = os.environ.get("STUDIO_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@pytest.fixture
def page(studio):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run "
                                   "scripts/studio_browser.sh (pip install playwright)")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium found (chromium, chromium-browser or google-chrome on PATH, or STUDIO_CHROMIUM): "
                    "run scripts/studio_browser.sh, which installs Debian's chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(studio.base + "/")
        page.wait_for_selector("body[data-ready='1']")
        yield page
        browser.close()
        assert not errors, errors  # no JavaScript error on any page


def _shots(tmp_path: Path, root: Path) -> Path:
    """$STUDIO_SCREENSHOTS (relative to the repository: the test runs in its own working folder) or a temp one."""
    folder = root / os.environ["STUDIO_SCREENSHOTS"] if os.environ.get("STUDIO_SCREENSHOTS") else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _set(page, path: str, value: str) -> None:
    field = page.locator(f"[data-path='{path}']")
    if field.evaluate("e => e.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)
        field.dispatch_event("change")


def _until(page, condition: str, timeout: float = 240_000) -> None:
    """Wait for a JavaScript condition; on a timeout, say what the page shows (the run's console, errors)."""
    try:
        page.wait_for_function(condition, timeout=timeout)
    except Exception as exc:
        shown = page.evaluate("() => [...document.querySelectorAll('.error, #run-status, #run-console')]"
                              ".map(e => e.id + ': ' + e.textContent).join('\\n')")
        raise AssertionError(f"{condition} did not happen: {exc}\n{shown}") from None


@pytest.mark.slow
def test_every_page_in_a_browser(page, studio, workspace, tmp_path, pytestconfig):
    shots = _shots(tmp_path, pytestconfig.rootpath)
    wait = 240_000

    # 1 Data: the broken line is listed by number; a sample's trained tokens are highlighted, the rest masked.
    bad_data(workspace)
    page.fill("#data-file", "bad.jsonl")
    page.fill("#data-model", str(workspace["model"]))
    page.click("#data-check-btn")
    page.wait_for_selector("#data-problems tr.problem[data-line='2']")
    assert "FAILED" in page.inner_text("#data-verdict")
    assert page.locator("svg.histogram").count() == 2  # token lengths, image sizes
    page.click("#data-samples-btn")
    page.wait_for_selector(".sample .tok.trained")
    trained = "".join(page.locator(".sample").first.locator(".tok.trained").all_inner_texts())
    assert trained.endswith("<|im_end|>") and page.locator(".sample .tok.masked").count() > 10
    page.screenshot(path=str(shots / "data.png"))

    # 2 Configure: the tiny run's settings typed into the form; a larger batch raises the estimate.
    page.click("nav [data-page='configure']")
    for path, value in tiny_form(workspace, **{"training.max_steps": "40"})["settings"].items():
        _set(page, path, value)
    page.wait_for_function("() => document.querySelector('#cfg-command').textContent.includes('training.max_steps=40')"
                           " && document.querySelector('#cfg-estimate-command').textContent.includes('max_steps=40')",
                           timeout=wait)
    before = float(page.get_attribute("#cfg-estimate-summary", "data-peak"))
    _set(page, "training.batch_size", "16")
    page.wait_for_function(f"() => parseFloat(document.querySelector('#cfg-estimate-summary').dataset.peak) > {before}",
                           timeout=wait)
    assert "training.batch_size=16" in page.inner_text("#cfg-command")
    assert "batch_size: 16" in page.inner_text("#cfg-yaml")
    page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
    page.screenshot(path=str(shots / "configure.png"))
    _set(page, "training.batch_size", "2")

    # 3 Train: start, watch the loss curve grow, stop (checkpoint), resume, finish.
    page.wait_for_function("() => document.querySelector('#cfg-command').textContent.includes('batch_size=2')")
    page.click("#cfg-train-btn")
    points = "Number(document.querySelector('#run-loss-img').dataset.points || 0)"
    _until(page, f"() => {points} >= 2")
    seen = page.evaluate(f"() => {points}")
    _until(page, f"() => {points} > {seen}")  # the curve updates while the run trains
    page.click("#run-stop")
    _until(page, "() => document.querySelector('#run-status').dataset.status === 'stopped'")
    page.click("#run-resume")
    _until(page, "() => document.querySelector('#run-status').dataset.status === 'finished'")
    assert "resumed from checkpoint" in page.locator("#run-console").text_content()
    assert page.locator("#run-curves svg.curve").count() >= 2  # learning rate, tokens/s (and memory)
    page.screenshot(path=str(shots / "train.png"), full_page=True)

    # 4 Try it: the run's adapter (filled in) and its base answer one question; predict scores the val file.
    page.click("nav [data-page='try']")
    page.wait_for_function("() => document.querySelector('#try-adapter').value.endsWith('final')")
    page.set_input_files("#try-image", str(next((workspace["data"] / "images").iterdir())))
    page.fill("#try-prompt", "What colour is the shape?")
    page.click("#try-ask")
    page.wait_for_function("() => !['', 'thinking...'].includes(document.querySelector('#try-answer-tuned')"
                           ".textContent) && document.querySelector('#try-answer-base').textContent !== ''",
                           timeout=wait)
    page.fill("#try-data", str(workspace["val"]))
    page.click("#try-predict")
    page.wait_for_function("() => document.querySelector('#try-accuracy').textContent.includes('accuracy')",
                           timeout=wait)
    assert page.inner_text("#try-error") == ""
    page.screenshot(path=str(shots / "try.png"), full_page=True)

    # 5 Export: merged into a new folder; refused into the data folder (not vlmtune's).
    page.click("nav [data-page='export']")
    page.fill("#exp-out", str(workspace["data"]))
    page.click("#exp-btn")
    page.wait_for_function("() => document.querySelector('#exp-error').textContent.includes('did not write')",
                           timeout=wait)
    page.fill("#exp-out", "merged")
    page.click("#exp-btn")
    page.wait_for_function("() => document.querySelector('#exp-result').textContent.includes('merged model written')",
                           timeout=wait)
    assert (workspace["work"] / "merged" / "model.safetensors").is_file()
    page.screenshot(path=str(shots / "export.png"))
