"""The chat page served at `/` and `/chat`, over plain HTTP and in headless Chromium.

The browser tests drive the real page against the real service and the fake Ollama on
127.0.0.1: a streamed exchange and its stats, Stop and Escape, an engine that is down, the
socket dropping and the Reconnect button, the engine and model from `/health`, a phone-sized
screen, the keyboard, and the API key. One of them keeps a screenshot of a finished exchange
in `test-artifacts/chat-page.png` (and `docs/chat-page.png`, the README's, when that is
missing or `UPDATE_SCREENSHOTS=1`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from llm_service import web
from llm_service.chunking import Chunker
from tests.browser import Browser, chat_service, needs_chromium, open_page
from tests.fakes.ollama import FakeOllama, Reply, fake_tokens
from tests.support import RunningService, make_settings

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
STATS = re.compile(r"^(\d+) tokens · first token \d+ ms · \d+\.\d tokens/s$")


@pytest.fixture
async def chat(fake_ollama: FakeOllama) -> AsyncIterator[RunningService]:
    async with chat_service(make_settings(ollama_base_url=fake_ollama.url)) as running:
        yield running


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    async with open_page(tmp_path / "profile", viewport={"width": 1000, "height": 720}) as found:
        yield found


async def open_chat(page: Page, service: RunningService, path: str = "/chat") -> None:
    await page.goto(service.http + path)
    await expect(page.locator("#conn")).to_have_text("connected")
    await expect(page.locator("#session-id")).to_have_text(re.compile(r"^[0-9a-f-]{36}$"))


async def say(page: Page, text: str) -> None:
    await page.locator("#input").fill(text)
    await page.locator("#input").press("Enter")


async def finished_reply(page: Page, status: str = "complete") -> str:
    reply = page.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("data-status", status)
    return await reply.locator(".text").text_content() or ""


# ---- plain HTTP ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/chat"])
async def test_page_is_served_with_strict_headers(chat: RunningService, path: str) -> None:
    response = await chat.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>FastTalk chat</title>" in response.text
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "connect-src 'self' ws: wss:" in csp
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"

    async with httpx.AsyncClient(base_url=chat.http, timeout=5.0) as client:
        for asset, kind in (("chat.css", "text/css"), ("chat.js", "text/javascript")):
            got = await client.get(f"/static/{asset}")
            assert got.status_code == 200
            assert got.headers["content-type"].startswith(kind)
            assert got.headers["x-content-type-options"] == "nosniff"
            again = await client.get(
                f"/static/{asset}", headers={"If-None-Match": got.headers["etag"]}
            )
            assert again.status_code == 304
        for missing in ("chat.html.bak", "..%2Fweb.py", "nothing.js"):
            assert (await client.get(f"/static/{missing}")).status_code == 404


def test_page_references_nothing_outside_the_service() -> None:
    for name in ("chat.html", "chat.css", "chat.js"):
        text = (web.STATIC_DIR / name).read_text()
        code = re.sub(r"<!--.*?-->|/\*.*?\*/", "", text, flags=re.DOTALL)
        code = "\n".join(line.split("// ")[0] for line in code.splitlines())
        for pattern in ("http://", "https://", "//cdn", "@import", "url("):
            assert pattern not in code, f"{name} refers outside the service: {pattern}"


# ---- in the browser -----------------------------------------------------------------------


@needs_chromium
async def test_message_streams_the_upstream_reply_with_its_stats(
    chat: RunningService, fake_ollama: FakeOllama, browser: Browser
) -> None:
    chunks = ["The capital", " of France", " is Paris", ", on the", " Seine", "."]
    fake_ollama.script(Reply(chunks=chunks))
    page = browser.page
    await open_chat(page, chat)

    await say(page, "What is the capital of France?")

    assert await finished_reply(page) == "".join(chunks)
    await expect(page.locator(".msg.user .text")).to_have_text("What is the capital of France?")
    meta = await page.locator(".msg.assistant .meta").text_content() or ""
    matched = STATS.match(meta)
    assert matched, meta
    assert int(matched.group(1)) == fake_tokens("".join(chunks))
    assert await page.locator("#input").input_value() == ""
    await expect(page.locator("#input")).to_be_focused()
    assert fake_ollama.chats[0].messages[-1] == {
        "role": "user",
        "content": "What is the capital of France?",
    }
    assert browser.errors == []


@needs_chromium
@pytest.mark.parametrize("how", ["escape", "stop button"])
async def test_stopping_a_slow_reply_marks_it_interrupted(
    chat: RunningService, fake_ollama: FakeOllama, browser: Browser, how: str
) -> None:
    full = "tick " * 60
    fake_ollama.script(Reply(chunks=["tick "] * 60, delay=0.05))
    page = browser.page
    await open_chat(page, chat)
    await say(page, "Count slowly.")
    reply = page.locator(".msg.assistant").last
    await expect(reply.locator(".text")).to_contain_text("tick tick tick")
    await expect(reply).to_have_class(re.compile(r"\bstreaming\b"))
    await expect(page.locator("#send")).to_be_disabled()

    if how == "escape":
        await page.keyboard.press("Escape")
    else:
        await page.locator("#stop").click()

    partial = await finished_reply(page, "interrupted")
    await expect(reply.locator(".meta")).to_have_text(re.compile(r"^interrupted · \d+ tokens"))
    await fake_ollama.chats[0].wait_closed(limit=2)
    assert 0 < len(partial) < len(full) and full.startswith(partial)
    await expect(page.locator("#stop")).to_be_disabled()
    await page.locator("#input").fill("Next")
    await expect(page.locator("#send")).to_be_enabled()
    assert browser.errors == []


@needs_chromium
async def test_the_voice_view_shows_each_clause_on_a_line_of_its_own(
    chat: RunningService, fake_ollama: FakeOllama, browser: Browser
) -> None:
    text = "Sure, here is the plan. First we walk, then we rest; after that, we eat."
    chunks = [text[i : i + 4] for i in range(0, len(text), 4)]
    fake_ollama.script(Reply(chunks=chunks))
    chunker = Chunker("clause")
    pieces = [piece for chunk in chunks for piece in chunker.feed(chunk)]
    pieces += [rest] if (rest := chunker.flush()) else []
    page = browser.page
    await open_chat(page, chat)
    await page.locator("#settings summary").click()
    await page.locator("#chunking").select_option("clause")
    await page.locator("#apply").click()
    await expect(page.locator(".note").last).to_contain_text("voice view: clauses")

    await say(page, "What is the plan?")

    assert await finished_reply(page) == text
    lines = page.locator(".msg.assistant .chunks li")
    await expect(lines).to_have_count(len(pieces))
    assert await lines.all_text_contents() == pieces and len(pieces) >= 4
    meta = await page.locator(".msg.assistant .meta").text_content() or ""
    assert re.search(r"first piece \d+ ms", meta), meta
    assert browser.errors == []


@needs_chromium
async def test_engine_down_shows_the_error_with_its_code(
    chat: RunningService, fake_ollama: FakeOllama, browser: Browser
) -> None:
    page = browser.page
    await open_chat(page, chat)
    await expect(page.locator("#health")).to_have_attribute("data-status", "healthy")
    await fake_ollama.refuse()

    await say(page, "Hello?")

    error = page.locator(".msg.error").last
    await expect(error.locator("code")).to_have_text("upstream_unavailable")
    assert len(await error.locator(".text").text_content() or "") > len("upstream_unavailable ")
    await expect(page.locator(".msg.assistant")).to_have_count(0)
    # /health answers 503 with its JSON body; the page still reads it.
    await expect(page.locator("#health")).to_have_attribute("data-status", "unhealthy")

    await fake_ollama.accept()
    await say(page, "Hello again?")
    assert await finished_reply(page) == "Hello, world!"


@needs_chromium
async def test_dropped_socket_shows_disconnected_and_reconnect_works(
    fake_ollama: FakeOllama, browser: Browser
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url)
    page = browser.page
    async with chat_service(settings) as first:
        await open_chat(page, first)
        old_session = await page.locator("#session-id").text_content()
        await first.runner.shutdown()  # as on SIGTERM: idle sockets get a frame and close 1001

    await expect(page.locator("#conn")).to_have_text("disconnected")
    await expect(page.locator("#banner")).to_be_visible()
    await expect(page.locator("#banner-text")).to_contain_text("Disconnected (code 1001")
    await expect(page.locator(".msg.error code")).to_have_text("service_shutting_down")
    await expect(page.locator("#send")).to_be_disabled()

    async with chat_service(settings, port=first.port) as second:
        await expect(page.locator("#reconnect")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#conn")).to_have_text("connected")
        await expect(page.locator("#banner")).to_be_hidden()
        await expect(page.locator("#session-id")).not_to_have_text(old_session or "")
        await say(page, "Are you back?")
        assert await finished_reply(page) == "Hello, world!"
        assert second.port == first.port


@needs_chromium
async def test_page_shows_engine_and_model_from_health(
    chat: RunningService, browser: Browser
) -> None:
    page = browser.page
    await open_chat(page, chat, path="/")
    await expect(page.locator("#engine")).to_have_text("ollama · llama3.2:1b")
    await expect(page.locator("#health-status")).to_have_text("healthy")


@needs_chromium
async def test_phone_screen_has_no_horizontal_scroll(
    chat: RunningService, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    unbroken = "x" * 300
    fake_ollama.script(Reply(chunks=["A long word: ", unbroken, " and some more text."]))
    phone = {"width": 390, "height": 844}
    async with open_page(
        tmp_path / "phone", viewport=phone, is_mobile=True, has_touch=True, device_scale_factor=2
    ) as found:
        page = found.page
        await open_chat(page, chat)
        await say(page, "Send me something wide: " + "y" * 200)
        await finished_reply(page)
        await page.locator("#settings summary").click()
        await expect(page.locator("#system-prompt")).to_be_visible()

        widths = await page.evaluate(
            "() => [document.documentElement.scrollWidth, document.body.scrollWidth,"
            " document.getElementById('transcript').scrollWidth, window.innerWidth]"
        )
        assert max(widths[:3]) <= widths[3] == 390, widths
        for control in ("#input", "#send", "#stop"):
            await expect(page.locator(control)).to_be_in_viewport()
            box = await page.locator(control).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        assert found.errors == []
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=ARTIFACTS / "chat-page-phone.png")


@needs_chromium
async def test_shift_enter_adds_a_line_and_enter_sends(
    chat: RunningService, fake_ollama: FakeOllama, browser: Browser
) -> None:
    page = browser.page
    await open_chat(page, chat)
    box = page.locator("#input")
    await box.click()
    await page.keyboard.type("first line")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("second line")

    assert await box.input_value() == "first line\nsecond line"
    await expect(page.locator(".msg.user")).to_have_count(0)

    await page.keyboard.press("Enter")
    await finished_reply(page)
    assert await page.locator(".msg.user .text").text_content() == "first line\nsecond line"
    assert fake_ollama.chats[0].messages[-1]["content"] == "first line\nsecond line"


@needs_chromium
async def test_api_key_goes_only_into_the_handshake(
    fake_ollama: FakeOllama, browser: Browser
) -> None:
    key = "s3cret-Key_1"
    handshakes: list[dict[str, Any]] = []
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_api_key=key)
    page = browser.page
    requests: list[tuple[str, dict[str, str]]] = []
    page.on("request", lambda request: requests.append((request.url, request.headers)))
    async with chat_service(settings, handshakes=handshakes) as service:
        await page.goto(service.http + "/chat")
        await expect(page.locator(".msg.error code")).to_have_text("unauthorized")
        await expect(page.locator("#banner-text")).to_contain_text("Set the API key")

        await page.locator("#settings summary").click()
        await page.locator("#api-key").fill("not a token")  # a space cannot go in a subprotocol
        await page.locator("#apply").click()
        await expect(page.locator(".msg.error code").last).to_have_text("invalid_api_key")
        await expect(page.locator("#banner-text")).to_contain_text("fix the API key")
        assert len(handshakes) == 1

        await page.locator("#api-key").fill(key)
        await page.locator("#apply").click()
        await expect(page.locator("#conn")).to_have_text("connected")
        await say(page, "Let me in")
        assert await finished_reply(page) == "Hello, world!"

    assert handshakes[0] == {"path": "/ws/llm", "query": "", "subprotocols": []}
    assert handshakes[-1] == {
        "path": "/ws/llm",
        "query": "",
        "subprotocols": ["fasttalk", f"bearer.{key}"],
    }
    for url, headers in requests:  # the page and /health: the key never goes there
        assert key not in url and key not in str(headers), url
    assert await page.evaluate("() => sessionStorage.getItem('fasttalk.apiKey')") == key
    assert await page.evaluate("() => localStorage.length") == 0


@needs_chromium
async def test_refused_origin_says_how_to_allow_it(
    fake_ollama: FakeOllama, browser: Browser
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url, llm_allowed_origins="https://chat.example.org"
    )
    page = browser.page
    async with chat_service(settings) as service:
        await page.goto(service.http + "/chat")
        await expect(page.locator("#conn")).to_have_text("disconnected")
        await expect(page.locator("#banner-text")).to_have_text(
            re.compile(rf"^Could not connect .*must then list {re.escape(service.http)}\)\.$")
        )
        await expect(page.locator("#reconnect")).to_be_visible()


@needs_chromium
async def test_screenshot_of_a_finished_exchange(
    chat: RunningService, fake_ollama: FakeOllama, browser: Browser
) -> None:
    answer = (
        "The capital of France is Paris. It sits on the Seine in the north of the country "
        "and has been the seat of government for most of the last thousand years."
    )
    # A pace like a small model's on a laptop, so the stats in the picture look like real ones.
    fake_ollama.script(
        Reply(chunks=re.findall(r"\S+\s*", answer), first_delay=0.08, delay=0.012),
        Reply(
            chunks=re.findall(r"\S+\s*", "About 2.1 million in the city itself."),
            first_delay=0.06,
            delay=0.02,
        ),
    )
    page = browser.page
    await open_chat(page, chat)
    await page.locator("#settings summary").click()
    await page.locator("#system-prompt").fill("You are a concise geography tutor.")
    await page.locator("#temperature").fill("0.3")
    await page.locator("#max-tokens").fill("256")
    await page.locator("#apply").click()
    await expect(page.locator(".note")).to_have_text(
        "New conversation · temperature 0.3 · max tokens 256 · system prompt set"
    )
    await page.locator("#settings summary").click()

    await say(page, "What is the capital of France?")
    assert await finished_reply(page) == answer
    await say(page, "And how many people live there?")
    await finished_reply(page)
    await expect(page.locator(".msg.assistant .meta")).to_have_text([STATS, STATS])
    request = fake_ollama.chats[0]
    assert request.messages[0] == {
        "role": "system",
        "content": "You are a concise geography tutor.",
    }
    assert request.options["temperature"] == 0.3
    assert request.options["num_predict"] == 256

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    await page.screenshot(path=shot)
    assert shot.stat().st_size > 10_000
    docs = ROOT / "docs" / "chat-page.png"
    if not docs.exists() or os.environ.get("UPDATE_SCREENSHOTS") == "1":
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs)
    assert browser.errors == []
