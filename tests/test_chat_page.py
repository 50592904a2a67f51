"""The chat page at `/` of the public listener, in a real Chromium (Debian's, driven by Playwright),
against the real daemon with the stand-in model: what a person with the link and a key sees."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from browser_harness import needs_browser, screenshot
from daemon_harness import DaemonProc, env_with, start
from helpers import TEST_KEY
from playwright.sync_api import Browser, Page, expect

pytestmark = needs_browser
LONG = " ".join(f"word{i}" for i in range(80))  # 80 tokens at 40 ms: a 3 s stream to stop or cut


@pytest.fixture
def daemon(daemons: list[DaemonProc], daemon_env: dict[str, str]) -> DaemonProc:
    d = start(daemons, env_with(daemon_env, STANDIN_TOKEN_DELAY_MS="40", RESUME_COOLDOWN="1"))
    d.wait_state("serving")
    return d


def open_chat(browser: Browser, d: DaemonProc, key: str | None = TEST_KEY, **kw: Any) -> Page:
    page = browser.new_context(**kw).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Uncaught exceptions and console errors of the page's own code (not the browser's note of each 4xx/5xx).
    page.on(
        "console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text else None
    )
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(d.status()["public_url"] + "/")
    if key is not None:
        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").dispatch_event("change")
    return page


def ask(page: Page, text: str) -> None:
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def answers(page: Page) -> list[str]:
    return page.locator(".msg.assistant .body").all_inner_texts()


def test_a_chat_streams_and_stop_stops_it(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon)
    expect(page.locator("#model")).to_have_value("standin/test")  # the settings closed once the key worked
    expect(page.get_by_role("region", name="Settings")).to_be_hidden()
    ask(page, "hello there")
    log = page.get_by_role("log")
    expect(log).to_contain_text("[stand-in] hello there")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("tokens out")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("tokens/s")

    ask(page, LONG)
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(page.locator(".msg.assistant .body").last).to_contain_text("word5")
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Send")).to_be_visible()
    expect(page.locator(".msg.assistant .meta").last).to_contain_text("stopped")
    partial = answers(page)[-1]
    time.sleep(0.5)  # the stream really ended: nothing more arrives
    assert answers(page)[-1] == partial and "word79" not in partial, partial

    # Regenerate answers the same question again, in full this time.
    page.get_by_role("button", name="Regenerate").click()
    expect(page.locator(".msg.assistant").last).to_contain_text("word79", timeout=10_000)
    assert len(answers(page)) == 2
    assert not page.errors, page.errors  # type: ignore[attr-defined]
    screenshot(page, "chat.png")


def test_model_output_is_shown_as_text_never_run(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    # The stand-in repeats the question: the reply carries markup and a javascript: link.
    ask(page, '<img src=x onerror="alert(1)"> [click](javascript:alert(2)) <script>alert(3)</script> **bold** `code`')
    reply = page.locator(".msg.assistant .body").last
    expect(reply).to_contain_text('<img src=x onerror="alert(1)">')
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("code")).to_have_text("code")
    assert page.locator("#log img, #log script").count() == 0
    assert page.locator("#log a").count() == 0  # not a link at all: only http(s) and mailto become links
    page.wait_for_timeout(300)
    assert dialogs == []


def test_markdown_renders_what_chat_models_write(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon)
    md = (
        "# Title\n\nSome *em* and a [link](https://example.org/x).\n\n"
        "```python\nprint('<b>hi</b>')\n```\n\n- one\n- two\n\n1. first\n2. second\n\n"
        "| a | b |\n|---|---|\n| 1 | <i>2</i> |\n\n> quoted\n"
    )
    html = page.evaluate(
        "md => { const d = document.createElement('div'); d.appendChild(renderMarkdown(md)); return d.innerHTML; }", md
    )
    for needle in (
        "<h3>Title</h3>",
        "<em>em</em>",
        '<a href="https://example.org/x" rel="noopener noreferrer nofollow" target="_blank">link</a>',
        "<code class=\"language-python\">print('&lt;b&gt;hi&lt;/b&gt;')</code>",
        "<ul><li>one</li><li>two</li></ul>",
        "<ol><li>first</li><li>second</li></ol>",
        "<td>&lt;i&gt;2&lt;/i&gt;</td>",
        "<blockquote><p>quoted</p></blockquote>",
    ):
        assert needle in html, (needle, html)
    assert html.count("Copy code") == 1


def test_a_reasoning_model_shows_its_thinking_apart(browser: Browser, daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, VLLM_ARGS="--reasoning-parser qwen3"))
    d.wait_state("serving")
    page = open_chat(browser, d)
    ask(page, "why is the sky blue")
    thinking = page.locator("details.thinking")
    expect(thinking.locator("summary")).to_have_text(re.compile(r"^Thinking \(\d+\.\d s\)$"))
    expect(thinking.locator(".text")).to_have_text("The user wrote 5 words; I will repeat them.")
    expect(page.locator(".msg.assistant .body").last).to_contain_text("[stand-in] why is the sky blue")


def test_the_key_field_and_what_a_401_says(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon, key=None)
    key = page.get_by_label("API key")
    expect(key).to_be_visible()  # no key yet: the settings are open
    ask(page, "are you there")
    expect(page.get_by_role("alert")).to_contain_text("needs an API key (401)")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("are you there")  # never lost
    key.fill("wrong-key-0000000000000000")
    key.dispatch_event("change")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("alert")).to_contain_text("refused this API key (401)")
    key.fill(TEST_KEY)
    key.dispatch_event("change")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("log")).to_contain_text("[stand-in] are you there")
    expect(page.get_by_role("alert")).to_be_hidden()
    # The key is remembered by this browser: a reload needs no typing.
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(TEST_KEY)


def test_a_yield_mid_answer_and_the_way_back(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon)
    ask(page, LONG)
    expect(page.locator(".msg.assistant .body").last).to_contain_text("word3")
    daemon.start_job("job_77")
    # The stream is cut: the partial answer stays, our message under it.
    expect(page.locator(".msg.assistant .error")).to_contain_text("GPUs reclaimed by a Slurm job")
    assert "word79" not in answers(page)[-1]
    expect(page.locator("#state")).to_have_text("offline")
    expect(page.get_by_role("status")).to_contain_text("GPUs reclaimed by a Slurm job")
    # A question asked while away waits, counts down, and is answered once the model is back.
    ask(page, "still there?")
    expect(page.locator(".msg.assistant .waiting")).to_contain_text("Trying again in")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    daemon.end_job("job_77")
    expect(page.locator(".msg.assistant").last).to_contain_text("[stand-in] still there?", timeout=20_000)
    expect(page.locator("#state")).to_have_text("online")
    assert not page.errors, page.errors  # type: ignore[attr-defined]


def test_stop_while_waiting_gives_the_question_back(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon)
    daemon.start_job("job_78")
    daemon.wait_state("yielded")
    ask(page, "my long careful question")
    expect(page.locator(".msg.assistant .waiting")).to_contain_text("GPUs reclaimed by a Slurm job")
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("textbox", name="Message")).to_have_value("my long careful question")
    assert page.locator(".msg").count() == 0


def test_conversations_stay_in_the_browser(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon)
    ask(page, "first conversation")
    expect(page.get_by_role("log")).to_contain_text("[stand-in] first conversation")
    page.get_by_role("button", name="New chat").click()
    ask(page, "second conversation")
    expect(page.get_by_role("log")).to_contain_text("[stand-in] second conversation")
    page.get_by_role("textbox", name="Message").fill("a draft I am typing")
    page.reload()
    expect(page.get_by_role("log")).to_contain_text("[stand-in] second conversation")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("a draft I am typing")
    chats = page.get_by_role("navigation", name="Conversations")
    chats.get_by_role("button", name="first conversation", exact=True).click()
    expect(page.get_by_role("log")).to_contain_text("[stand-in] first conversation")
    chats.get_by_role("button", name="Delete chat first conversation").click()
    expect(chats.get_by_role("button", name="first conversation", exact=True)).to_have_count(0)
    expect(page.get_by_role("log")).to_contain_text("[stand-in] second conversation")


def test_bad_input_and_faults_get_clear_words(browser: Browser, daemons, daemon_env) -> None:
    d = start(
        daemons, env_with(daemon_env, MAX_BODY_BYTES="2048", MAX_CONCURRENT_PER_KEY="1", STANDIN_TOKEN_DELAY_MS="40")
    )
    st = d.wait_state("serving")
    page = open_chat(browser, d)
    # A paste over MAX_BODY_BYTES: said so, and the text stays in the box.
    huge = "x" * 3000
    ask(page, huge)
    expect(page.get_by_role("alert")).to_contain_text("too large")
    expect(page.get_by_role("textbox", name="Message")).to_have_value(huge)
    # A 429 (this key already has its one request in flight): waited out, then answered.
    with (
        httpx.Client(timeout=30) as other,
        other.stream(
            "POST",
            st["public_url"] + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {TEST_KEY}"},
            json={"model": "standin/test", "messages": [{"role": "user", "content": LONG}], "stream": True},
        ) as r,
    ):
        assert r.status_code == 200
        ask(page, "my turn")
        expect(page.locator(".msg.assistant .waiting")).to_contain_text("Too many requests at once for this key")
    expect(page.get_by_role("log")).to_contain_text("[stand-in] my turn", timeout=15_000)
    # The gateway gone (the daemon stopped): the page says so and keeps trying.
    assert d.terminate() == 0
    ask(page, "anyone?")
    expect(page.locator(".msg.assistant .waiting")).to_contain_text("cannot be reached")
    expect(page.locator("#state")).to_have_text("unreachable", timeout=20_000)
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("textbox", name="Message")).to_have_value("anyone?")


def test_on_a_phone_screen(browser: Browser, daemon: DaemonProc) -> None:
    page = open_chat(browser, daemon, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    ask(page, "hello from a phone with **bold** and `code`")
    expect(page.get_by_role("log")).to_contain_text("[stand-in] hello from a phone")
    box = page.get_by_role("button", name="Send").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, box
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
    screenshot(page, "chat-phone.png")


def test_chat_page_off_leaves_a_status_page(browser: Browser, daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, CHAT_PAGE="off"))
    st = d.wait_state("serving")
    page = browser.new_page()
    page.goto(st["public_url"] + "/")
    expect(page.locator("h1")).to_have_text("standin/test")
    expect(page.locator("#state")).to_have_text("online")
    expect(page.get_by_role("textbox", name="Message")).to_have_count(0)
