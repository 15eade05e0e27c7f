#!/usr/bin/env python3
"""The web console in a real browser (headless Chromium through chromedriver), against a live
`sandwarden serve`: sign-in, sessions, chat with the echo agent (streaming, approvals, cancel,
options, attachments), a shell's terminal, the admin page and sign-out. Nothing is mocked.

    console_test.py --url http://127.0.0.1:PORT        (the admin key in SANDWARDEN_ADMIN_KEY)

The key is read from the environment rather than the command line so it does not show in `ps`.
Every page visited is saved to target/console-screenshots/NN-name.png. Each check that does not
hold fails the script (exit status 1) with what was seen; the last lines printed say what was
measured.
"""

import argparse
import json
import os
import pathlib
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHOTS = ROOT / "target" / "console-screenshots"
KEY_SLOT = "sandwarden.key"
# A 1x1 PNG, to attach as an image.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201e2a5b3d60000000049454e44ae426082"
)


class Console:
    def __init__(self, url, key):
        self.url = url.rstrip("/")
        self.key = key
        self.run = secrets.token_hex(4)  # makes every text this run sends distinct
        self.shot_no = 0
        self.resources = []  # resource URLs the page loaded, collected before each reload
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                    "--disable-dev-shm-usage"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob("*.png"):
            old.unlink()
        self.logs = []

    # ---- helpers

    def wait(self, what, condition, timeout=20):
        """Waits until condition(driver) is truthy; its value, or a failure naming `what`."""
        try:
            # Rows are redrawn as sessions change: an element may go stale between two looks.
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                                 ignored_exceptions=[StaleElementReferenceException]).until(condition)
        except TimeoutException:
            self.shot("timeout")
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def visible(self, css):
        return self.wait(f"{css} to show", lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None))

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def shot(self, name):
        self.shot_no += 1
        self.driver.save_screenshot(str(SHOTS / f"{self.shot_no:02d}-{name}.png"))

    def text_of(self, element):
        return element.get_attribute("textContent")

    def stored_key(self):
        return self.js("return sessionStorage.getItem(arguments[0]);", KEY_SLOT)

    def collect_resources(self):
        self.resources += self.js(
            "return performance.getEntriesByType('resource').map(e => e.name);")
        self.logs += self.driver.get_log("browser")

    def load(self, path):
        """Navigates (a new document): what the old one loaded is kept first."""
        if self.resources or self.shot_no:
            self.collect_resources()
        self.driver.get(self.url + path)
        self.js("performance.setResourceTimingBufferSize(100000);")

    def call(self, method, path, body=None, key=None):
        """The API itself, to check what the console did: (status, JSON)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {key or self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, json.loads(res.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def go(self, hash_):
        self.js("location.hash = arguments[0];", hash_)

    def listed(self, rows_css, more_css, what):
        """The first element matching `rows_css`, clicking "Load more" (`more_css`) until it shows
        (a server that has run a while lists more sessions than a page holds)."""
        def found(d):
            rows = d.find_elements(By.CSS_SELECTOR, rows_css)
            if rows:
                return rows[0]
            more = d.find_elements(By.CSS_SELECTOR, more_css)
            if more and more[0].is_displayed() and more[0].is_enabled():
                more[0].click()
            return None
        return self.wait(what, found)

    def session_row(self, session):
        return self.listed(f"#sessions-table tr[data-session-id='{session}']", "#sessions-more",
                           f"session {session} in the list")

    # ---- chat helpers

    def click_send(self):
        # Send stays disabled until the previous turn's stream has closed, a moment after its
        # last event is drawn.
        self.wait("Send to be enabled", lambda d: d.find_element(By.ID, "send").is_enabled())
        self.find("#send").click()

    def send(self, text, keyboard=False):
        """Sends `text` from the composer (with Send, or Ctrl+Enter); the new turn's element."""
        before = len(self.finds("#history .turn"))
        box = self.find("#message-input")
        box.clear()
        box.send_keys(text)
        if keyboard:
            self.wait("Send to be enabled", lambda d: d.find_element(By.ID, "send").is_enabled())
            box.send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            self.click_send()
        return self.wait("the turn to show", lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#history .turn")[before:] or [None])[0])

    def answer(self, turn):
        return "".join(self.text_of(s) for s in turn.find_elements(By.CSS_SELECTOR, ".msg.assistant .text-seg"))

    def turn_end(self, turn, timeout=20):
        """Waits for the turn to end; its outcome (completed, cancelled, failed)."""
        status = turn.find_element(By.CSS_SELECTOR, "[data-test=turn-status]")
        return self.wait("the turn to end", lambda d: (
            status.get_attribute("data-status") if status.get_attribute("data-status") != "running" else None),
            timeout)

    def api_turn(self, session, turn):
        status, body = self.call("GET", f"/v1/sessions/{session}/turns/{turn.get_attribute('data-turn-id')}")
        assert status == 200, body
        return body

    # ---- terminal helpers

    def screen(self):
        """The xterm screen as text, a line per row (the DOM renderer draws rows as divs)."""
        return self.js(
            "return [...document.querySelectorAll('#terminal .xterm-rows > div')]"
            ".map(r => r.textContent.replace(/\\u00a0/g, ' ').trimEnd()).join('\\n');")

    def type_in_terminal(self, text):
        self.find("#terminal .xterm-helper-textarea").send_keys(text)

    # ---- the flows

    def sign_in_form(self):
        started = time.monotonic()
        self.load("/")
        self.wait("the sign-in button to be enabled", lambda d: d.find_element(By.ID, "signin-submit").is_enabled())
        usable_ms = (time.monotonic() - started) * 1000
        nav = self.js("const n = performance.getEntriesByType('navigation')[0];"
                      "return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd};")
        print(f"sign-in form usable after {usable_ms:.0f} ms (wall clock from navigation);"
              f" DOMContentLoaded {nav['dcl']:.0f} ms, load {nav['load']:.0f} ms in the browser")
        assert usable_ms < 5000, f"the sign-in form took {usable_ms:.0f} ms to become usable"
        # xterm.js is for terminal pages only: the first page does not load it.
        loaded = self.js("return performance.getEntriesByType('resource').map(e => e.name);")
        assert not any("xterm" in r for r in loaded), loaded
        self.shot("sign-in")

    def wrong_key(self):
        self.find("#key-input").send_keys(f"not-a-key-{self.run}")
        self.find("#signin-submit").click()
        error = self.visible("#signin-error")
        assert "refused" in error.text, error.text
        assert self.stored_key() is None
        assert not self.find("#topbar").is_displayed()
        self.shot("wrong-key")

    def sign_in(self):
        box = self.find("#key-input")
        box.clear()
        box.send_keys(self.key)
        self.find("#signin-submit").click()
        self.visible("#sessions-page")
        assert self.stored_key() == self.key
        assert self.find("#nav-admin").is_displayed(), "the admin key sees the admin page link"
        self.wait("the live sessions watch", lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live")
        self.shot("sessions")

    def create_session(self, template, title):
        self.go("#/sessions")
        self.visible("#create-form")
        Select(self.find("#create-template")).select_by_value(template)
        self.find("#create-title").send_keys(title)
        self.find("#create-submit").click()
        page = self.visible("#session-page h1")
        session = self.find("#session-page").get_attribute("data-session-id")
        assert session.startswith("ses_"), session
        assert page.text == title, page.text
        self.wait(f"session {session} to be ready",
                  lambda d: d.find_element(By.CSS_SELECTOR, "#session-meta [data-field=status]").text == "ready")
        assert self.find("#session-meta [data-field=harness]").text == template
        status, body = self.call("GET", f"/v1/sessions/{session}")
        assert status == 200 and body["harness"] == template and body["title"] == title, body
        return session

    def chat(self, session):
        # Plain echo: the streamed answer is the prompt, byte for byte.
        prompt = f"console echo {self.run} with several words to stream"
        turn = self.send(prompt)
        assert self.turn_end(turn) == "completed"
        assert self.answer(turn) == prompt, (self.answer(turn), prompt)
        assert self.text_of(turn.find_element(By.CSS_SELECTOR, ".msg.user")).endswith(prompt)
        stored = self.api_turn(session, turn)
        assert stored["status"] == "completed" and stored["text"] == prompt, stored
        self.shot("chat-echo")

        # A tool call and its result, as a card.
        turn = self.send(f"/tool tooled {self.run}", keyboard=True)
        assert self.turn_end(turn) == "completed"
        card = turn.find_element(By.CSS_SELECTOR, ".card.tool")
        assert "read echo.txt" in self.text_of(card) and f"tooled {self.run}" in self.text_of(card), self.text_of(card)
        assert "completed" in self.text_of(card.find_element(By.CSS_SELECTOR, "[data-test=tool-status]"))

        # Reasoning, folded.
        turn = self.send(f"/think deep {self.run}")
        assert self.turn_end(turn) == "completed"
        fold = turn.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert fold.get_attribute("open") is None, "reasoning starts folded"
        assert self.text_of(fold).endswith(f"thinking about: deep {self.run}"), self.text_of(fold)
        assert self.answer(turn) == f"deep {self.run}"
        self.shot("chat-tool-reasoning")

    def approve(self, session):
        question = f"may the console test {self.run} go on?"
        turn = self.send(f"/ask {question}")
        card = self.wait("the approval card", lambda d: (
            turn.find_elements(By.CSS_SELECTOR, ".input-required") or [None])[0])
        assert question in self.text_of(card), self.text_of(card)
        self.visible("#cancel")  # a turn waits: it can be cancelled
        self.wait("the session to wait for input",
                  lambda d: d.find_element(By.CSS_SELECTOR, "#session-meta [data-field=status]").text == "input_required")
        self.shot("chat-approval")
        card.find_element(By.CSS_SELECTOR, "[data-decision=approve_once]").click()
        assert self.turn_end(turn) == "completed"
        assert self.answer(turn) == "permission granted (allow-once)", self.answer(turn)
        assert "answered: Approve" in self.text_of(card)
        stored = self.api_turn(session, turn)
        assert stored["status"] == "completed", stored
        self.wait("Cancel to go once the turn ended", lambda d: not d.find_element(By.ID, "cancel").is_displayed())

    def cancel(self, session):
        turn = self.send(f"/slow 300 slowtick-{self.run}")
        # It streams: chunks show while the turn still runs.
        self.wait("a few chunks", lambda d: self.answer(turn).count(f"slowtick-{self.run}") >= 3)
        assert turn.find_element(By.CSS_SELECTOR, "[data-test=turn-status]").get_attribute("data-status") == "running"
        self.shot("chat-slow")
        self.visible("#cancel").click()
        assert self.turn_end(turn) == "cancelled"
        seen = self.answer(turn)
        full = "".join(f"slowtick-{self.run} {i}\n" for i in range(300))
        assert full.startswith(seen) and len(seen) < len(full), seen
        status, turns = self.call("GET", f"/v1/sessions/{session}/turns?limit=500")
        assert status == 200, turns
        mine = [t for t in turns["turns"] if t["turn_id"] == turn.get_attribute("data-turn-id")]
        assert mine and mine[0]["status"] == "cancelled", mine
        self.shot("chat-cancelled")

    def options(self, session):
        """Model, mode and thinking: chosen from what the agent offers, sent with the message."""
        model = Select(self.wait("the model choices", lambda d: (
            lambda e: e if e.tag_name == "select" else None)(d.find_element(By.ID, "opt-model"))))
        offered = [o.get_attribute("value") for o in model.options]
        assert offered == ["", "echo-small", "echo-large"], offered
        assert model.first_selected_option.text == "unchanged (echo-small)"
        model.select_by_value("echo-large")
        Select(self.find("#opt-agent")).select_by_value("plan")
        Select(self.find("#opt-thinking")).select_by_value("true")
        turn = self.send("/config")
        assert self.turn_end(turn) == "completed"
        for setting in ("model=echo-large", "mode=plan", "thinking=low"):
            assert setting in self.answer(turn), (setting, self.answer(turn))
        # In force now: the fields say so and go back to "unchanged".
        self.wait("the model in force", lambda d: Select(
            d.find_element(By.ID, "opt-model")).first_selected_option.text == "unchanged (echo-large)")
        assert Select(self.find("#opt-agent")).first_selected_option.text == "unchanged (plan)"
        assert Select(self.find("#opt-thinking")).first_selected_option.text == "unchanged (low)"
        _, listed = self.call("GET", f"/v1/sessions/{session}/options")
        assert {o["id"]: o["current"] for o in listed["options"]}["model"] == "echo-large", listed
        self.shot("chat-options")

    def attachments(self, session):
        with tempfile.TemporaryDirectory() as tmp:
            note = pathlib.Path(tmp, f"note-{self.run}.txt")
            note.write_text(f"attached words {self.run}")
            image = pathlib.Path(tmp, "dot.png")
            image.write_bytes(PNG)
            self.find("#attach-input").send_keys(f"{note}\n{image}")
            self.wait("the attachments listed", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments li")) == 2)
            turn = self.send(f"with files {self.run}")
            assert self.turn_end(turn) == "completed"
        expected = f"with files {self.run}\nFile {note.name}:\nattached words {self.run} [1 image(s) received]"
        assert self.answer(turn) == expected, (self.answer(turn), expected)
        assert turn.find_elements(By.CSS_SELECTOR, ".msg.user img.thumb"), "the image shows in the message"
        assert not self.finds("#attachments li"), "the attachments are cleared once sent"
        self.shot("chat-attachments")

        # A message the server refuses (the echo agent takes no binary file): the problem's
        # detail shows, no turn is made, and the message stays to be fixed.
        turns = len(self.finds("#history .turn"))
        with tempfile.TemporaryDirectory() as tmp:
            blob = pathlib.Path(tmp, "blob.bin")
            blob.write_bytes(b"\xff\xfe\x00\x01")
            self.find("#attach-input").send_keys(str(blob))
            self.wait("the attachment listed", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments li")) == 1)
            self.find("#message-input").send_keys(f"binary {self.run}")
            self.click_send()
            error = self.visible("#chat-error")
        assert "does not accept binary files" in error.text, error.text
        assert len(self.finds("#history .turn")) == turns, "a refused message makes no turn"
        assert self.find("#message-input").get_attribute("value") == f"binary {self.run}"
        self.shot("chat-refused")
        self.find("#attach-clear").click()
        assert not self.finds("#attachments li")
        turn = self.send(f"binary {self.run}")
        assert self.turn_end(turn) == "completed" and self.answer(turn) == f"binary {self.run}"
        assert not self.find("#chat-error").is_displayed(), "a message that went through clears the error"

    def history(self, session, prompts):
        """A reload reads the history from the store; the key survives it (session storage)."""
        self.load("/#/session/" + session)
        self.visible("#chat")
        self.wait("the history", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history .msg.user")) >= len(prompts))
        users = [self.text_of(m) for m in self.finds("#history .msg.user")]
        for p in prompts:
            assert any(u.endswith(p) for u in users), (p, users)
        self.shot("chat-history")
        # A turn another client starts shows as it happens (the page follows the session's events).
        elsewhere = f"sent elsewhere {self.run}"
        status, started = self.call("POST", f"/v1/sessions/{session}/messages", {"text": elsewhere, "async": True})
        assert status == 202, started
        turn = self.wait("the other client's turn", lambda d: (
            d.find_elements(By.CSS_SELECTOR, f"#history .turn[data-turn-id='{started['turn_id']}']") or [None])[0])
        assert self.turn_end(turn) == "completed"
        assert self.answer(turn) == elsewhere, self.answer(turn)

    def waiting_question(self, session):
        """A question asked while no page was open shows when the chat opens, and is answered
        there."""
        self.go("#/sessions")
        question = f"may the console test {self.run} answer later?"
        status, started = self.call("POST", f"/v1/sessions/{session}/messages",
                                    {"text": f"/ask {question}", "async": True})
        assert status == 202, started
        for _ in range(200):
            status, waiting = self.call("GET", f"/v1/sessions/{session}/inputs")
            if status == 200 and waiting["inputs"]:
                break
            time.sleep(0.05)
        assert waiting["inputs"], waiting
        self.go(f"#/session/{session}")
        turn = self.wait("the waiting question", lambda d: (
            d.find_elements(By.CSS_SELECTOR, f"#history .turn[data-turn-id='{started['turn_id']}']") or [None])[0])
        card = self.wait("its approval card", lambda d: (
            turn.find_elements(By.CSS_SELECTOR, ".input-required") or [None])[0])
        assert question in self.text_of(card), self.text_of(card)
        self.shot("chat-waiting-question")
        card.find_element(By.CSS_SELECTOR, "[data-decision=deny]").click()
        assert self.turn_end(turn) == "completed"
        assert self.answer(turn) == "permission denied (reject-once)", self.answer(turn)

    def client_tool(self):
        """A client tool's call shows its request; the output typed in goes back to the agent."""
        status, session = self.call("POST", "/v1/sessions", {
            "harness": "echo", "title": f"tools {self.run}",
            "client_tools": [{"name": "lookup", "description": "looks a word up"}]})
        assert status == 201, session
        self.go(f"#/session/{session['id']}")
        self.visible("#composer")
        turn = self.send('/calltool lookup {"word": "%s"}' % self.run)
        card = self.wait("the tool call", lambda d: (
            turn.find_elements(By.CSS_SELECTOR, ".input-required") or [None])[0])
        assert "lookup" in self.text_of(card) and self.run in self.text_of(card), self.text_of(card)
        card.find_element(By.CSS_SELECTOR, "[data-test=tool-output]").send_keys(f"looked up {self.run}")
        self.shot("chat-client-tool")
        card.find_element(By.CSS_SELECTOR, "[data-test=tool-output-submit]").click()
        assert self.turn_end(turn) == "completed"
        assert self.answer(turn) == f"tool lookup answered: looked up {self.run}", self.answer(turn)
        return session["id"]

    def older_history(self):
        """A history longer than a page: the newest shows, "Load older" brings the rest in order."""
        status, session = self.call("POST", "/v1/sessions", {"harness": "echo", "title": f"long {self.run}"})
        assert status == 201, session
        prompts = [f"line {i:03d} {self.run}" for i in range(60)]  # 120 messages: two pages
        for p in prompts:
            status, body = self.call("POST", f"/v1/sessions/{session['id']}/messages", {"text": p})
            assert status == 200 and body["text"] == p, body
        self.go(f"#/session/{session['id']}")
        older = self.visible("#history-older")

        def users():
            return [self.text_of(m)[len("user"):] for m in self.finds("#history .msg.user")]

        assert users() == prompts[-50:], users()  # the newest page: the last 100 messages
        older.click()
        self.wait("the older page", lambda d: len(users()) == len(prompts))
        assert users() == prompts, users()
        assert not self.find("#history-older").is_displayed(), "nothing older is left"
        answers = [self.text_of(m)[len("assistant"):] for m in self.finds("#history .msg.assistant")]
        assert answers == prompts, answers
        self.shot("chat-older-history")
        return session["id"]

    def live_list(self, session):
        """The list follows statuses live: a turn sent by another client shows as running."""
        self.go("#/sessions")
        self.visible("#sessions-page")
        self.session_row(session)
        row = f"#sessions-table tr[data-session-id='{session}'] [data-test=status]"
        status, _ = self.call("POST", f"/v1/sessions/{session}/messages",
                              {"text": f"/slow 300 listed-{self.run}", "async": True})
        assert status == 202
        self.wait("the row to show running", lambda d: d.find_element(By.CSS_SELECTOR, row).text == "running")
        self.shot("sessions-live")
        status, _ = self.call("POST", f"/v1/sessions/{session}/cancel")
        assert status == 202
        self.wait("the row to show ready again", lambda d: d.find_element(By.CSS_SELECTOR, row).text == "ready")
        # The template filter.
        Select(self.find("#filter-template")).select_by_value("shell")
        self.wait("the filter", lambda d: "template=shell" in d.current_url)
        self.wait("the filtered list", lambda d: not d.find_elements(By.CSS_SELECTOR, row))
        Select(self.find("#filter-template")).select_by_value("")

    def terminal(self):
        session = self.create_session("shell", f"shell {self.run}")
        self.wait("the terminal to connect",
                  lambda d: d.find_element(By.ID, "tty-status").get_attribute("data-state") == "connected")
        self.wait("the shell's prompt", lambda d: self.screen().strip())
        # Typed text and its output differ ($((6*7)) becomes 42): the output is the shell's.
        marker = f"console-42-{self.run}-marker"
        self.type_in_terminal(f"echo console-$((6*7))-{self.run}-marker\n")
        self.wait("the command's output", lambda d: marker in self.screen().split("\n"))
        self.shot("terminal")

        box = self.find("#terminal")
        before = (int(box.get_attribute("data-cols")), int(box.get_attribute("data-rows")))
        self.driver.set_window_size(900, 700)
        after = self.wait("the terminal to refit", lambda d: (
            lambda now: now if now != before else None)(
                (int(box.get_attribute("data-cols")), int(box.get_attribute("data-rows")))))
        assert after[0] < before[0], (before, after)
        # The size the shell sees, from the server's PTY: `stty size` prints "rows cols".
        self.type_in_terminal("stty size\n")
        self.wait(f"stty to print {after[1]} {after[0]}",
                  lambda d: f"{after[1]} {after[0]}" in self.screen().split("\n"))
        print(f"terminal resized from {before[0]}x{before[1]} to {after[0]}x{after[1]} (cols x rows); stty agrees")
        self.shot("terminal-resized")

        # Re-attaching replays the screen.
        self.find("#tty-reattach").click()
        self.wait("the terminal to connect again",
                  lambda d: d.find_element(By.ID, "tty-status").get_attribute("data-state") == "connected")
        self.wait("the replayed screen", lambda d: marker in self.screen().split("\n"))

        # The program's end: its exit code shows, and the session is dead.
        self.type_in_terminal("exit 7\n")
        status = self.wait("the exit", lambda d: (
            lambda s: s if s.get_attribute("data-state") == "exited" else None)(d.find_element(By.ID, "tty-status")))
        assert status.get_attribute("data-exit-code") == "7", status.text
        assert "code 7" in status.text, status.text
        self.wait("the session to show dead",
                  lambda d: d.find_element(By.CSS_SELECTOR, "#session-meta [data-field=status]").text == "dead")
        self.shot("terminal-exited")
        self.driver.set_window_size(1280, 900)
        return session

    def admin(self, sessions):
        self.find("#nav-admin").click()
        self.visible("#admin-page")
        self.wait("the keys", lambda d: d.find_elements(By.CSS_SELECTOR, "#keys-table tr[data-key-id]"))
        rows = self.finds("#keys-table tr[data-key-id]")
        assert any(r.get_attribute("data-tenant") == "default" and "yes" in r.text for r in rows), \
            [r.text for r in rows]
        # A new key: shown once, and it works.
        tenant = f"console-{self.run}"
        self.find("#newkey-tenant").send_keys(tenant)
        self.find("#newkey-submit").click()
        new_key = self.visible("#newkey-value").get_attribute("value")
        assert self.call("GET", "/v1/templates", key=new_key)[0] == 200
        row_css = f"#keys-table tr[data-tenant='{tenant}']"
        row = self.wait("the new key's row", lambda d: (d.find_elements(By.CSS_SELECTOR, row_css) or [None])[0])
        key_id = row.get_attribute("data-key-id")
        self.shot("admin-new-key")
        # Limits.
        row.find_element(By.CSS_SELECTOR, "[data-test=limits]").click()
        editor = self.visible(f"tr[data-limits-for='{key_id}']")
        editor.find_element(By.NAME, "live_sessions").send_keys("3")
        editor.find_element(By.NAME, "budget.tokens").send_keys("5000")
        editor.find_element(By.CSS_SELECTOR, "[data-test=limits-save]").click()
        self.wait("the limits to show", lambda d: 'live_sessions=3' in d.find_element(By.CSS_SELECTOR, f"{row_css} td.limits").text)
        _, keys = self.call("GET", f"/v1/api-keys?tenant={tenant}")
        assert keys["api_keys"][0]["limits"] == {"live_sessions": 3, "budget": {"tokens": 5000}}, keys
        # Usage, and every tenant's sessions.
        self.wait("the usage", lambda d: d.find_elements(By.CSS_SELECTOR, "#usage-table tr[data-tenant=default]"))
        for session in sessions:
            self.listed(f"#tenant-sessions [data-tenant=default] tr[data-session-id='{session}']",
                        "#tenant-sessions [data-tenant=default] [data-test=more]", f"{session} among the tenant's")
        self.shot("admin")
        # Revoke, confirmed in the browser's dialog.
        self.find(f"{row_css} [data-test=revoke]").click()
        self.wait("the confirm dialog", lambda d: d.switch_to.alert).accept()
        self.wait("the key to show revoked",
                  lambda d: d.find_element(By.CSS_SELECTOR, f"{row_css} [data-test=revoked]").text)
        assert self.call("GET", "/v1/templates", key=new_key)[0] == 401, "a revoked key is refused"
        self.shot("admin-revoked")

    def delete(self, session):
        self.go("#/sessions")
        self.visible("#sessions-page")
        self.session_row(session).find_element(By.CSS_SELECTOR, "[data-test=delete]").click()
        self.wait("the confirm dialog", lambda d: d.switch_to.alert).accept()
        self.wait("the row to show deleted", lambda d: d.find_element(
            By.CSS_SELECTOR, f"#sessions-table tr[data-session-id='{session}'] [data-test=status]").text == "deleted")
        assert self.call("GET", f"/v1/sessions/{session}")[1]["status"] == "deleted"

    def sign_out(self):
        self.find("#signout").click()
        self.visible("#signin-form")
        assert self.stored_key() is None
        assert self.js("return sessionStorage.length + localStorage.length;") == 0
        assert self.js("return document.cookie;") == ""
        assert not self.finds("#view *"), "nothing of the signed-in pages is left"
        self.shot("signed-out")

    def tenant_view(self, admin_sessions):
        """A tenant's key: no admin page, and only its own sessions."""
        status, created = self.call("POST", "/v1/api-keys", {"tenant": f"plain-{self.run}"})
        assert status == 201, created
        self.find("#key-input").send_keys(created["key"])
        self.find("#signin-submit").click()
        self.visible("#sessions-page")
        assert not self.find("#nav-admin").is_displayed(), "a tenant's key has no admin page"
        self.go("#/admin")
        self.wait("#/admin to send a tenant back to its sessions", lambda d: d.current_url.endswith("#/sessions"))
        self.visible("#sessions-page")
        self.wait("the (empty) list", lambda d: d.find_element(By.CSS_SELECTOR, "#sessions-page p.muted").is_displayed())
        assert not set(admin_sessions) & {r.get_attribute("data-session-id") for r in self.finds("tr[data-session-id]")}
        self.shot("tenant-sessions")
        self.find("#signout").click()
        self.visible("#signin-form")
        assert self.stored_key() is None

    def only_this_origin(self):
        self.collect_resources()
        others = [r for r in self.resources if not r.startswith(self.url + "/")]
        assert not others, f"requests to other origins: {others}"
        assert any(r.endswith("/console/vendor/xterm.js") for r in self.resources), "the terminal loaded xterm.js"
        csp = [e for e in self.logs if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]
        assert not csp, f"CSP violations: {csp}"
        uncaught = [e for e in self.logs if "Uncaught" in e["message"]]
        assert not uncaught, f"script errors: {uncaught}"
        leaked = [e for e in self.logs if self.key in e["message"]]
        assert not leaked, "the key was written to the browser console"
        assert not [r for r in self.resources if self.key in r], "the key went into a URL"
        print(f"{len(self.resources)} requests, all to {self.url}; no CSP violation or script error"
              f" in the {len(self.logs)} console lines:")
        for entry in self.logs:
            print(f"  {entry['level']}: {entry['message'][:200]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("SANDWARDEN_URL"), help="the server, e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    key = os.environ.get("SANDWARDEN_ADMIN_KEY")
    if not args.url or not key:
        parser.error("give --url (or SANDWARDEN_URL) and the admin key in SANDWARDEN_ADMIN_KEY")
    c = Console(args.url, key)
    try:
        c.sign_in_form()
        c.wrong_key()
        c.sign_in()
        echo = c.create_session("echo", f"echo {c.run}")
        c.chat(echo)
        c.approve(echo)
        c.cancel(echo)
        c.options(echo)
        c.attachments(echo)
        c.history(echo, [f"console echo {c.run} with several words to stream", f"/ask may the console test {c.run} go on?"])
        c.waiting_question(echo)
        tools = c.client_tool()
        long = c.older_history()
        c.live_list(echo)
        shell = c.terminal()
        c.admin([echo, shell, tools, long])
        c.delete(echo)
        c.sign_out()
        c.tenant_view([echo, shell, tools, long])
        c.only_this_origin()
        print(f"console test passed; screenshots in {SHOTS}")
    except Exception:
        # What the page said, for the failure's report; the screenshot is best effort.
        for entry in c.logs + c.driver.get_log("browser"):
            print("browser:", entry["level"], entry["message"], file=sys.stderr)
        try:
            c.shot("failure")
        except Exception as e:  # the browser may be gone
            print(f"no failure screenshot: {e}", file=sys.stderr)
        raise
    finally:
        c.driver.quit()


if __name__ == "__main__":
    main()
