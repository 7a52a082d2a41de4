"""The chat page at `/` in headless Chromium (Debian's chromium driven by playwright): send by keyboard, watch the
reply stream with its reasoning and tool call, open the reasoning, stop a generation, keep and export the
conversation. Screenshots go to the test's tmp dir (printed)."""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest
from serve_helpers import running_server

CHROMIUM = next((p for p in (os.environ.get("GLM5_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium found (apt-get install chromium, or set GLM5_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
ANSWER = "The weather in Paris is mild. " * 6
LONG = " ".join(f"word{i}" for i in range(400))
FORCED: list[str] = []


@pytest.fixture(scope="module")
def server():
    argv = ["--preset", "nano", "--max-model-len", "2048", "--kv-cache-tokens", "8192"]
    with running_server(argv, forced=FORCED) as (base_url, app):
        llm = app.state.engine.engine
        step = llm.step

        def paced_step():  # a few ms a step, so a person (or a test) can watch the stream and stop it
            time.sleep(0.004)
            return step()

        llm.step = paced_step
        yield base_url, app


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_reasoning_tool_calls_stops_and_exports(server, browser, tmp_path):
    base_url, app = server
    page = browser.new_page(viewport={"width": 1200, "height": 800}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(base_url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model").input_value() == "nano"
    page.screenshot(path=str(tmp_path / "1-empty.png"))

    # settings: tools, temperature; then a message sent with the keyboard alone
    page.locator("#settings summary").click()
    page.fill("#tools", json.dumps(TOOLS))
    page.fill("#temperature", "0")
    page.locator("#temperature").dispatch_event("change")
    page.locator("#settings summary").click()
    FORCED.append("The user wants the weather, so I check it first.</think>" + ANSWER +
                  "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>")
    page.focus("#input")
    page.keyboard.type("What is the weather in Paris?")
    page.keyboard.press("Enter")
    reply = page.locator("article.message.assistant").last
    # the reply streams: the content grows while the message is marked streaming
    page.wait_for_function("document.querySelector('article.assistant .content')?.textContent.length > 0")
    seen = [len(reply.locator(".content").text_content())]
    streaming_seen = "streaming" in (reply.get_attribute("class") or "")
    page.screenshot(path=str(tmp_path / "2-streaming.png"))
    page.wait_for_function("!document.querySelector('article.assistant').classList.contains('streaming')",
                           timeout=60_000)
    final = reply.locator(".content").text_content()
    assert final == ANSWER.strip() and streaming_seen and seen[0] < len(final)
    assert reply.locator(".tool-name").text_content() == "get_weather"
    assert json.loads(reply.locator(".tool-call pre").text_content()) == {"city": "Paris"}
    # the reasoning is collapsed; opening it shows the text
    reasoning = reply.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None
    assert not reply.locator(".reasoning-text").is_visible()
    reasoning.locator("summary").click()
    assert reply.locator(".reasoning-text").is_visible()
    assert reply.locator(".reasoning-text").text_content() == "The user wants the weather, so I check it first."
    page.screenshot(path=str(tmp_path / "3-reasoning-open.png"))
    # and by keyboard: the summary takes focus and Enter toggles it
    reasoning.locator("summary").focus()
    page.keyboard.press("Enter")
    assert reasoning.get_attribute("open") is None and not reply.locator(".reasoning-text").is_visible()
    page.keyboard.press("Enter")
    assert reply.locator(".reasoning-text").is_visible()

    # a long answer, stopped with Esc: the stream ends early and the server aborts the request
    FORCED.append("</think>" + LONG)
    page.focus("#input")
    page.keyboard.type("Count for me")
    page.keyboard.press("Enter")
    long_reply = page.locator("article.message.assistant").last
    page.wait_for_function("[...document.querySelectorAll('article.assistant')].at(-1)"
                           ".querySelector('.content').textContent.length > 20")
    assert not page.locator("#stop").is_disabled()
    page.screenshot(path=str(tmp_path / "4-before-stop.png"))
    page.keyboard.press("Escape")
    page.wait_for_function("[...document.querySelectorAll('article.assistant')].at(-1).querySelector('.status')"
                           ".textContent === 'stopped'")
    stopped_text = long_reply.locator(".content").text_content()
    assert 0 < len(stopped_text) < len(LONG) // 2
    assert page.locator("#stop").is_disabled() and not page.locator("#send").is_disabled()
    deadline = time.monotonic() + 10
    while app.state.engine.engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.engine.engine.num_running == 0, "the stopped request is still generating"
    page.screenshot(path=str(tmp_path / "5-stopped.png"))

    # the conversation survives a reload and exports as JSON
    page.reload()
    page.wait_for_selector("article.message.assistant")
    assert page.locator("article.message").count() == 4
    with page.expect_download() as download:
        page.keyboard.press("Alt+e")
    saved = json.loads(open(download.value.path()).read())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert saved["messages"][1]["reasoning"].startswith("The user wants")
    assert saved["messages"][3]["status"] == "stopped"
    # keyboard: Alt+N starts a new chat, listed beside the first
    page.keyboard.press("Alt+n")
    assert page.locator("#conversations li").count() == 2
    page.screenshot(path=str(tmp_path / "6-after-reload.png"))
    assert httpx.get(base_url + "/health").json()["status"] == "ok"
    assert not errors, errors
    print(f"screenshots: {tmp_path}")


def test_page_files_are_served_with_types_and_nothing_else(server):
    base_url = server[0]
    index = httpx.get(base_url + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "/page/app.js" in index.text and "http" not in index.text.replace("http-equiv", "")  # no CDN
    assert httpx.get(base_url + "/page/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(base_url + "/page/style.css").headers["content-type"].startswith("text/css")
    assert httpx.get(base_url + "/page/../app.py").status_code == 404
    assert httpx.get(base_url + "/page/secret.txt").status_code == 404
