"""
A real browser drives the chat page: headless Chromium (Debian packages `chromium` + `chromium-driver`) controlled
through chromedriver's W3C WebDriver HTTP API with plain `requests` (no selenium needed). It types a message, watches
the reply stream in, checks the text against the engine's own output, shows a server error, starts a new
conversation, and saves a screenshot to tests/artifacts/ (or $NANOCHAT_TEST_ARTIFACTS).
Skips cleanly when Chromium or chromedriver is not installed.
"""

import os
import time
import base64
import shutil
import socket
import tempfile
import subprocess
from pathlib import Path

import pytest
import requests

from scripts import chat_web
from nanochat.chat import ReplyDecoder, message_chunks, assemble_prompt
from test_chat_web import LiveServer, build_tiny_chat_model, make_args, make_worker
from conftest import RowCounter

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("NANOCHAT_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
ENTER = "\ue007"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                 reason=f"needs {CHROMIUM} and chromedriver (apt-get install chromium chromium-driver)")]


class Browser:
    """The handful of WebDriver commands the test needs."""

    def __init__(self, driver_url, user_data_dir):
        self.driver_url = driver_url
        options = {"binary": CHROMIUM, "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", "--window-size=1100,850"]}
        capabilities = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        value = self._call("POST", f"{driver_url}/session", capabilities)
        self.session = f"{driver_url}/session/{value['sessionId']}"

    def _call(self, method, url, payload=None):
        r = requests.request(method, url, json=payload, timeout=60)
        value = r.json().get("value")
        if r.status_code != 200:
            raise AssertionError(f"WebDriver {method} {url} failed: {value}")
        return value

    def get(self, url):
        self._call("POST", f"{self.session}/url", {"url": url})

    def find(self, css):
        return self._call("POST", f"{self.session}/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def type(self, css, text, clear=False):
        element = self.find(css)
        if clear:
            self._call("POST", f"{self.session}/element/{element}/clear", {})
        self._call("POST", f"{self.session}/element/{element}/value", {"text": text})

    def click(self, css):
        self._call("POST", f"{self.session}/element/{self.find(css)}/click", {})

    def js(self, script, *args):
        return self._call("POST", f"{self.session}/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script, timeout=60, what="condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def screenshot(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))

    def quit(self):
        try:
            self._call("DELETE", self.session)
        except Exception:
            pass


@pytest.fixture
def browser(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "chromedriver.log", "w")
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    driver_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                if requests.get(driver_url + "/status", timeout=2).json()["value"]["ready"]:
                    break
            except (requests.ConnectionError, KeyError, ValueError):
                pass
            assert driver.poll() is None and time.time() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        user_data_dir = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
        b = Browser(driver_url, user_data_dir)
        try:
            yield b
        finally:
            b.quit()
    finally:
        driver.terminate()
        driver.wait(timeout=10)
        log.close()


def expected_reply(model, tokenizer, text, seed, max_tokens, temperature, top_k):
    """What the server will stream for a one-message conversation, computed directly with the engine."""
    from nanochat.engine import Engine
    prompt, _ = assemble_prompt(tokenizer, message_chunks(tokenizer, [{"role": "user", "content": text}]), 10_000)
    decoder, pieces = ReplyDecoder(tokenizer), []
    for column, _ in Engine(model, tokenizer).generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed):
        if column[0] in decoder.stop_tokens:
            break
        pieces.append(decoder.feed(column[0]))
    pieces.append(decoder.flush())
    return [p for p in pieces if p]


class PacedModel(RowCounter):
    """The real model, slowed to ~30 forwards/s so each token reaches the page in its own network chunk."""

    def forward(self, ids, kv_cache=None):
        time.sleep(0.03)
        return super().forward(ids, kv_cache=kv_cache)


def test_chat_page_in_a_real_browser(browser, tiny_tokenizer):
    model = build_tiny_chat_model(tiny_tokenizer.get_vocab_size(), seed=0)
    message, max_tokens = "Hello there, tiny model!", 24
    # a server-wide seed makes the reply predictable; pick one whose reply streams in several pieces
    for seed in range(100):
        pieces = expected_reply(model, tiny_tokenizer, message, seed, max_tokens, temperature=0.8, top_k=50)
        if len(pieces) >= 4:
            break
    expected = "".join(pieces)
    worker = make_worker(0, PacedModel(model), tiny_tokenizer)
    app = chat_web.create_app(make_args(seed=seed, max_message_chars=200), workers=[worker])
    with LiveServer(app) as live:
        browser.get(live.url + "/")
        browser.wait_for("return document.readyState === 'complete'", what="page load")
        assert browser.js("return document.title") == "NanoChat"
        # the health check runs on load and leaves its verdict in the banner's own style: hidden = the server is ready
        verdict = browser.wait_for("return document.getElementById('banner').style.display", what="the health check")
        assert verdict == "none" and browser.js("return getComputedStyle(document.getElementById('banner')).display") == "none"

        # record every state the reply goes through, to see it arrive piece by piece
        browser.js("""
            window.__snapshots = [];
            new MutationObserver(() => {
              const replies = document.querySelectorAll('.message.assistant');
              if (replies.length) window.__snapshots.push(replies[replies.length - 1].textContent);
            }).observe(document.getElementById('column'), {subtree: true, childList: true, characterData: true});""")
        browser.type("#max-tokens", str(max_tokens), clear=True)
        browser.type("#chat-input", message + ENTER)
        browser.wait_for("return !document.body.classList.contains('generating') && "
                         "document.querySelectorAll('.message.assistant').length === 1", what="the reply")
        assert browser.js("return document.querySelector('.message.user').textContent") == message
        shown = browser.js("return document.querySelector('.message.assistant').textContent")
        assert shown == expected, (shown, expected)
        snapshots = [s for s in browser.js("return window.__snapshots") if s]
        partial = [s for s in snapshots if s != expected]
        assert len(partial) >= 2 and all(expected.startswith(s) for s in partial), snapshots  # streamed, in order
        browser.screenshot(ARTIFACTS / "browser_chat.png")

        # regenerate: clicking the reply asks again (same server seed, so the same text comes back)
        browser.js("window.__snapshots = [];")
        browser.click(".message.assistant")
        browser.wait_for("return window.__snapshots.length > 0 && !document.body.classList.contains('generating') && "
                         "document.querySelectorAll('.message.assistant').length === 1", what="the regenerated reply")
        assert browser.js("return document.querySelector('.message.assistant').textContent") == expected
        # edit: clicking the user message puts it back in the input and removes the exchange; Enter resends it
        browser.click(".message.user")
        assert browser.js("return document.querySelectorAll('.message').length") == 0
        assert browser.js("return document.getElementById('chat-input').value") == message
        browser.type("#chat-input", ENTER)
        browser.wait_for("return !document.body.classList.contains('generating') && "
                         "document.querySelectorAll('.message.assistant').length === 1", what="the re-sent reply")
        assert browser.js("return document.querySelector('.message.assistant').textContent") == expected

        # a server-side validation error is shown in the reply bubble, in red
        browser.type("#chat-input", "x" * 201 + ENTER)
        error = browser.wait_for("const e = document.querySelector('.error-box'); return e && e.textContent", what="the error box")
        assert "Error 400" in error and "too long" in error
        browser.screenshot(ARTIFACTS / "browser_error.png")

        # slash command, then a new conversation empties the page
        browser.type("#chat-input", "/help" + ENTER)
        assert "/temperature" in browser.wait_for("const c = document.querySelector('.message.console'); return c && c.textContent")
        # an out-of-range setting is caught on the page, and the typed message is kept
        browser.type("#temperature", "5", clear=True)
        browser.type("#chat-input", "still here" + ENTER)
        consoles = browser.js("return [...document.querySelectorAll('.message.console')].map(c => c.textContent)")
        assert "Temperature must be between 0.0 and 2.0." in consoles[-1]
        assert browser.js("return document.getElementById('chat-input').value") == "still here"
        browser.click("#new-chat")
        assert browser.js("return document.querySelectorAll('.message').length") == 0


def test_stop_button_keeps_the_partial_reply_and_frees_the_worker(browser, tiny_tokenizer):
    from test_chat_web import FakeModel, wait_for_stats
    token = tiny_tokenizer.encode("hello")[0]
    piece = tiny_tokenizer.decode([token])
    model = FakeModel(token, tiny_tokenizer.get_vocab_size(), delay=0.05)  # streams forever until stopped
    app = chat_web.create_app(make_args(max_tokens=4096), workers=[make_worker(0, model, tiny_tokenizer)])
    with LiveServer(app) as live:
        browser.get(live.url + "/")
        browser.wait_for("return document.readyState === 'complete'", what="page load")
        browser.type("#max-tokens", "4096", clear=True)
        browser.type("#chat-input", "Talk forever" + ENTER)
        browser.wait_for("const a = document.querySelector('.message.assistant'); return a && a.textContent.length > 20",
                         what="streaming to start")
        assert browser.js("return document.body.classList.contains('generating')")
        browser.click("#send-button")  # the send button is the stop button while generating
        browser.wait_for("return !document.body.classList.contains('generating')", what="generation to stop")
        kept = browser.js("return document.querySelector('.message.assistant').textContent")
        assert kept == piece * (len(kept) // len(piece)) and len(kept) > 20  # what arrived stays on the page
        stats = wait_for_stats(live, lambda s: s["requests_cancelled"] == 1)  # the server stopped generating
        assert stats["rows_in_use"] == 0 and model.forwards < 1000
        browser.screenshot(ARTIFACTS / "browser_stopped.png")
