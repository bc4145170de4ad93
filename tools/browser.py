"""satkit.serve's page in Debian's headless chromium, driven over the DevTools protocol on a pipe (the
standard library only: no Playwright, Selenium or chromedriver to install): the browser test
(tests/test_serve.py) and the README's screenshot.

    python -m tools.browser --checkpoint runs/flickr8k_lite/best.pt --photo PHOTO --out docs/serve.png

`caption_in_page` opens the page, uploads a photo through its file input, waits for the caption, clicks
a word for real (mouse events at its position) and saves a screenshot.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--remote-debugging-pipe")
WINDOW = (1280, 900)  # CSS pixels of the page the screenshot shows


def find_chromium() -> str | None:
    """Debian's chromium (`apt-get install chromium`), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    """chromium died, answered a command with an error, or a wait ran out."""


class Chromium:
    """A headless chromium and one page in it, spoken to over --remote-debugging-pipe: chromium reads
    NUL-terminated JSON commands on its fd 3 and writes answers and events on its fd 4."""

    def __init__(self, executable: str, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="satkit-chromium-")
        commands_r, self._commands = os.pipe()  # we write, chromium reads (its fd 3)
        self._answers, answers_w = os.pipe()  # chromium writes (its fd 4), we read
        # Its ends moved to fds >= 10 and put on 3 and 4 by bash (subprocess cannot place an fd at a number;
        # dash takes one-digit fds only), so no renumbering can overwrite another.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, answers_w)]
        for fd in (commands_r, answers_w):
            os.close(fd)
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-; exec "$@"', "bash",
             executable, *CHROMIUM_ARGS, f"--user-data-dir={self._profile.name}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=ends)
        for fd in ends:
            os.close(fd)
        self._stderr: list[bytes] = []
        threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True).start()
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)["targetId"]
            attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=None)
            self.session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Network"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._commands, self._answers):
            try:
                os.close(fd)
            except OSError:
                pass
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._profile.cleanup()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = "") -> dict[str, Any]:
        """One command; its result. Events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        session = self.session if session == "" else session
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise BrowserError(f"chromium did not answer within {self.timeout_s:g} s")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise BrowserError("chromium exited: " + b"".join(self._stderr).decode(errors="replace")[-500:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value (promises awaited), as JSON."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise BrowserError(f"waited {self.timeout_s:g} s for {what}")

    def click(self, selector: str) -> None:
        """A real click (mouse pressed and released) at the middle of the element."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def requested_urls(self) -> list[str]:
        """Every URL the page asked for, but data: URLs (which never leave the page)."""
        urls = [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]
        return [url for url in urls if not url.startswith("data:")]


_CANVAS_DIGEST = ("(() => { const c = document.getElementById({id}); const d = c.getContext('2d')"
                  ".getImageData(0, 0, c.width, c.height).data; let h = 0;"
                  " for (let i = 0; i < d.length; i++) h = (h * 31 + d[i]) >>> 0; return h + ':' + c.width; })()")


@dataclass
class PageRun:
    """What `caption_in_page` saw."""

    captions: list[str]  # the n-best captions shown
    words: list[str]  # the words of the selected caption
    status: str  # the status line (time taken)
    overlay_before: dict[str, str] = field(default_factory=dict)  # canvas id -> digest, first word selected
    overlay_after: dict[str, str] = field(default_factory=dict)  # after clicking the word
    measures: str = ""  # the measures line after the click
    selected: str = ""  # the word button shown as selected after the click
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


def caption_in_page(url: str, photo: Path, screenshot: Path | None, word: int = 3,
                    executable: str | None = None, timeout_s: float = 30.0) -> PageRun:
    """Open the page at url, upload `photo`, wait for the captions, click word number `word` (1-based)
    and save a PNG screenshot of the page."""
    executable = executable or find_chromium()
    if executable is None:
        raise BrowserError("no chromium: apt-get install chromium")
    with Chromium(executable, timeout_s) as browser:
        browser.send("Page.navigate", {"url": url})
        browser.wait_for("document.readyState === 'complete' && document.getElementById('limit').textContent !== ''",
                         "the page to load")
        node = browser.send("Runtime.evaluate", {"expression": "document.getElementById('file')"})["result"]
        browser.send("DOM.setFileInputFiles", {"files": [str(Path(photo).resolve())], "objectId": node["objectId"]})
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                                 "the caption")
        status = browser.evaluate("document.getElementById('status').textContent")
        if state != "done":
            raise BrowserError(f"the page shows an error: {status}")
        digest = {c: browser.evaluate(_CANVAS_DIGEST.replace("{id}", json.dumps(c))) for c in ("paper", "highlight")}
        browser.click(f"#words .word:nth-child({word})")
        browser.wait_for(f"document.querySelector('#words .word:nth-child({word})').classList.contains('selected')"
                         f" && document.getElementById('measures').textContent.startsWith('{word}:')",
                         f"word {word} to be selected")
        time.sleep(0.2)  # the canvases are drawn right after the selection: let both finish
        after = {c: browser.evaluate(_CANVAS_DIGEST.replace("{id}", json.dumps(c))) for c in ("paper", "highlight")}
        run = PageRun(
            captions=browser.evaluate("[...document.querySelectorAll('#captions li span:first-child')]"
                                      ".map(s => s.textContent)"),
            words=browser.evaluate("[...document.querySelectorAll('#words .word')].map(b => b.textContent)"),
            status=status, overlay_before=digest, overlay_after=after,
            measures=browser.evaluate("document.getElementById('measures').textContent"),
            selected=browser.evaluate("document.querySelector('#words .word.selected').textContent"),
            requests=browser.requested_urls())
        if screenshot is not None:
            shot = browser.send("Page.captureScreenshot", {"format": "png"})
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        return run


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a checkpoint on a free port, caption one photo in the page, click a word, save the screenshot."""
    from satkit.infra.runtime import UserError, run_cli
    from satkit.serve import make_server

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--photo", required=True, type=Path)
    parser.add_argument("--word", type=int, default=3, help="the word to click, 1-based (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    parser.add_argument("--examples", nargs="*", default=[], help="example photos the page offers")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    def body() -> int:
        if find_chromium() is None:
            raise UserError("no chromium found: apt-get install chromium")
        server = make_server(args.checkpoint, port=0, quiet=True, examples=args.examples)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            run = caption_in_page(server.url, args.photo, args.out, word=args.word, timeout_s=120)
        finally:
            server.shutdown()
            server.server_close()
            server.worker.close()
        print(f"{args.photo.name}: {run.captions[0]}\n{run.status}\n{run.measures}\nwrote {args.out}")
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
