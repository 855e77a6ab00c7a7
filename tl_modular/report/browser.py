"""Headless Chromium driven over the DevTools protocol (standard library only): the report's
browser tests and ``tools/report_screenshot.py`` use it.

Chromium runs headless with ``--remote-debugging-pipe``: it reads commands from file descriptor
3 and writes replies and events to descriptor 4, each a JSON message ending in a NUL byte. No
websocket library, no WebDriver, no network port. Events are kept, so a test can assert that a
page logged no console error and made no network request after the fact.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "CDPError", "find_chromium"]


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, if any.

    >>> find_chromium()          # doctest: +SKIP
    '/usr/bin/chromium'
    """
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class CDPError(RuntimeError):
    """A protocol error, a JavaScript exception, or a browser that stopped answering."""


class Browser:
    """Headless Chromium driven over the DevTools protocol; one page attached (``self.session``).

    Args:
        executable: Chromium's path (default: :func:`find_chromium`).
        profile: A folder for the browser profile (a fresh temporary one is best).
        width, height: The page's viewport in CSS pixels.

    >>> with Browser(None, Path("/tmp/profile")) as b:                        # doctest: +SKIP
    ...     b.open(Path("tl_modular_report/report.html").resolve().as_uri())
    ...     b.click('.node[data-id="L0.H0"]')
    ...     b.js("document.getElementById('panel-label').textContent")
    ...     b.screenshot(Path("report.png"))
    """

    def __init__(self, executable: str | None, profile: Path, *, width: int = 1400, height: int = 900):
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError("no Chromium found on PATH: install it (Debian: apt-get install chromium) or "
                                    "pass its path")
        read_cmd, self._write = os.pipe()    # we write commands; Chromium reads them on fd 3
        self._read, write_evt = os.pipe()    # Chromium writes on fd 4; we read

        def wire() -> None:                  # in the child: the two pipe ends become fds 3 and 4
            a, b = os.dup(read_cmd), os.dup(write_evt)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "about:blank"],
            preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(read_cmd)
        os.close(write_evt)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    # --- protocol ---------------------------------------------------------------------------

    def _message(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            ready, _, _ = select.select([self._read], [], [], max(left, 0))
            if not ready:
                raise CDPError(f"no message from Chromium within {timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise CDPError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its reply (events seen meanwhile go to ``self.events``)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            reply = self._message(max(end - time.monotonic(), 0.01))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first event named ``method`` after the events already seen (waits for it)."""
        seen = len(self.events)
        end = time.monotonic() + timeout
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    return event
            seen = len(self.events)
            self.events.append(self._message(max(end - time.monotonic(), 0.01)))

    # --- page -------------------------------------------------------------------------------

    def open(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired", timeout)

    def js(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` in the page and return its value (JSON); JS exceptions raise."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in res:
            detail = res["exceptionDetails"]
            text = detail.get("exception", {}).get("description") or detail.get("text")
            raise CDPError(f"JavaScript error in {expression[:80]!r}: {text}")
        return res["result"].get("value")

    def center(self, selector: str) -> tuple[float, float]:
        """The centre of the first visible element matching ``selector``, scrolled into view."""
        box = self.js(f"""(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]
            .find((x) => x.getClientRects().length);
            if (!e) return null; e.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        if box is None:
            raise CDPError(f"no element matches {selector!r}")
        return box[0], box[1]

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the element's centre."""
        x, y = self.center(selector)
        self.mouse("mouseMoved", x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, **extra})

    def hover(self, selector: str) -> None:
        self.mouse("mouseMoved", *self.center(selector))

    def type(self, text: str) -> None:
        """Type into the focused element, one key event per character."""
        for ch in text:
            self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": ch, "key": ch, "unmodifiedText": ch})
            self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": ch})

    def key(self, key: str, code: str | None = None, keycode: int = 0) -> None:
        """Press a named key (``Enter``, ``Escape``, ``ArrowDown``, ``Tab``, ...)."""
        base = {"key": key, "code": code or key, "windowsVirtualKeyCode": keycode, "nativeVirtualKeyCode": keycode}
        text = {"Enter": "\r", "Tab": "\t", " ": " "}.get(key)
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", **base, **({"text": text} if text else {})})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **base})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    # --- what the page did ------------------------------------------------------------------

    def console_errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and browser log errors (CSP included)."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        """URLs of every request the page made (the page's own file included)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close", session=False, timeout=5)
                except (CDPError, OSError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for fd in (self._read, self._write):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
