"""The labelling page in a real headless Chromium: ranking with the mouse and the keyboard,
undo, rating, the arena, model output shown as text (never run), the token, two tabs.

Set LABEL_SCREENSHOTS_DIR to keep the screenshots (docs/make_screenshots.py does, for the
README); otherwise they go to a temporary folder.
"""

import json
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not os.environ.get("CI"):  # under CI a missing browser is a failure, not a skip
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM} (apt-get install chromium); CI runs this",
            allow_module_level=True,
        )
    pytest.importorskip("playwright", reason="pip install playwright")
    pytest.importorskip("uvicorn", reason="the label extra is not installed")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from palm_rlhf.label.app import create_app  # noqa: E402
from tests.label_helpers import XSS, ThreadServer, make_session  # noqa: E402

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPTS = [
    "Write one line about the sea.",
    "What should I name my cat?",
    "Explain rain to a child.",
    "Give me a proverb.",
]


def fake_generate(prompt: str, count: int, seed: int) -> list:
    flavours = [
        "A short, plain answer.",
        "A longer answer that wanders a little before it gets to the point, as samples do.",
        "An answer\nover two lines.",
        "Yes.",
        "Perhaps.",
    ]
    return [
        f"{flavours[(seed + i) % len(flavours)]} ({prompt.split()[0].lower()} #{i + 1})"
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("LABEL_SCREENSHOTS_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def served(tmp_path, token=None, generate=fake_generate, **options):
    session, config = make_session(tmp_path, prompts=PROMPTS, generate=generate, **options)
    return ThreadServer(create_app(session, config.settings(), token=token)), config


def records(config) -> list:
    return [json.loads(line) for line in Path(config.out).read_text().splitlines()]


def opened(page, url: str) -> None:
    page.goto(url)
    expect(page.locator('body[data-busy="0"] #item-id')).not_to_have_text("")


def saved(page, count: int) -> None:
    expect(page.locator("#progress")).to_contain_text(f"{count} / ")
    expect(page.locator('body[data-busy="0"]')).to_have_count(1)  # the next item is shown


def test_rank_with_mouse_keyboard_and_drag_then_undo(browser, tmp_path, shots):
    server, config = served(tmp_path, responses=3)
    with server:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        opened(page, server.url)
        cards = page.locator("#responses .card")
        expect(cards).to_have_count(3)
        expect(page.locator("#settings")).to_contain_text("temperature 0.8")
        page.locator(".card", has_text="#2").click()  # mouse: #2 best, then #1; #3 is last
        page.locator(".card", has_text="#1").click()
        page.screenshot(path=str(shots / "label-rank.png"))
        page.locator("#submit").click()
        saved(page, 1)
        page.keyboard.press("3")  # keyboard: #3 best, then #1
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        saved(page, 2)
        page.keyboard.press("1")
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        saved(page, 3)
        third = records(config)[2]["id"]
        page.keyboard.press("u")  # undo: the third label leaves the file, its item comes back
        saved(page, 2)
        expect(page.locator("#item-id")).to_have_text(third)
        assert [r["id"] for r in records(config)].count(third) == 0
        page.keyboard.press("2")
        page.keyboard.press("3")
        page.keyboard.press("Enter")
        saved(page, 3)
        page.locator(".card", has_text="#3").drag_to(page.locator(".card", has_text="#1"))
        expect(page.locator(".card .rank")).to_have_count(3)  # dragging orders the whole list
        page.keyboard.press("Enter")
        saved(page, 4)
        expect(page.locator("#waiting-text")).to_contain_text("All done")
    rankings = [r["ranking"] for r in records(config)]
    assert rankings[:3] == [[1, 0, 2], [1, 2, 0], [2, 0, 1]]
    assert rankings[3] == [1, 2, 0]  # #3 dropped on #1 (top): order #3, #1, #2


def test_rate_and_arena_pages(browser, tmp_path, shots):
    server, config = served(tmp_path / "rate", mode="rate", scale=5)
    with server:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        opened(page, server.url)
        page.keyboard.press("4")
        page.screenshot(path=str(shots / "label-rate.png"))
        page.keyboard.press("Enter")
        saved(page, 1)
        page.locator("#choices button", has_text="2").click()
        page.locator("#submit").click()
        saved(page, 2)
    assert [r["rating"] for r in records(config)] == [4, 2]

    server, config = served(tmp_path / "arena", mode="arena")
    with server:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        opened(page, server.url)
        for count, key in enumerate(("1", "2", "t"), 1):
            page.keyboard.press(key)
            page.keyboard.press("Enter")
            saved(page, count)
        expect(page.locator("#arena-text")).to_contain_text("95% Wilson interval")
        page.keyboard.press("2")
        page.screenshot(path=str(shots / "label-arena.png"))
    assert len(records(config)) == 2  # the tie went to the ties file


def test_model_output_is_shown_as_text_and_runs_nothing(browser, tmp_path):
    server, config = served(tmp_path, responses=2, generate=lambda prompt, n, seed: [XSS] * n)
    with server:
        page = browser.new_page()
        opened(page, server.url)
        expect(page.locator("#responses .response").first).to_have_text(XSS)
        assert page.locator("#responses img, #responses script").count() == 0
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        saved(page, 1)
        assert page.evaluate("window.__x === undefined && window.__y === undefined")


def test_the_token_is_needed_and_then_carried_by_the_page(browser, tmp_path):
    token = "a-long-secret-token"
    server, config = served(tmp_path, token=token, responses=2)
    with server:
        page = browser.new_page()
        assert page.goto(server.url).status == 401
        assert page.goto(f"{server.url}/?token=wrong-token").status == 403
        opened(page, f"{server.url}/?token={token}")
        expect(page.locator("#responses .card")).to_have_count(2)
        assert "token" not in page.url  # dropped from the address bar and history
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        saved(page, 1)
    assert len(records(config)) == 1


def test_two_tabs_get_different_items_and_both_labels_land(browser, tmp_path):
    server, config = served(tmp_path, responses=2)
    with server:
        context = browser.new_context()
        tabs = [context.new_page(), context.new_page()]
        for tab in tabs:
            opened(tab, server.url)
            expect(tab.locator("#responses .card")).to_have_count(2)
        ids = [tab.locator("#item-id").text_content() for tab in tabs]
        assert ids[0] != ids[1]
        for tab in tabs:
            tab.keyboard.press("1")
            tab.keyboard.press("Enter")
        saved(tabs[1], 2)
    assert sorted(r["id"] for r in records(config)) == sorted(ids)
