"""A headless Chromium driven over the DevTools protocol on a pipe (no Python dependency).

``chromium --headless --remote-debugging-pipe`` reads protocol commands on file
descriptor 3 and writes answers and events on 4, each a JSON text ended by a
NUL byte. :class:`Browser` opens one page and offers what the tests need:
load a URL, evaluate JavaScript, click, take a screenshot (PNG, decoded here
to check its pixels). Not a test module (imported as ``_chromium``).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from typing import Any

import pytest

__all__ = ["Browser", "chromium_path", "png_colors", "requires_chromium"]


def chromium_path() -> str | None:
    """The Chromium executable on PATH (Debian: ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


#: Skips where no Chromium is installed; the reason names the package that provides it.
requires_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason="chromium is not installed (apt-get install -y chromium; `make setup` does it)",
)


class ProtocolError(Exception):
    """The browser answered a command with an error, or not in time."""


class Browser:
    """One headless Chromium with one page; a context manager that always ends the process."""

    def __init__(self, *, width: int = 1200, height: int = 800, timeout: float = 30.0) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="ba-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", "--disable-extensions", "--mute-audio",
                "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}", "about:blank"]
        # bash puts our pipe ends at the descriptors the protocol expects (3 and 4); dash
        # cannot name a descriptor above 9.
        script = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self._proc = subprocess.Popen(
            ["bash", "-c", script, "chromium", *argv], pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget",
                                     {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1,
                       "mobile": False})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the protocol -----------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("the browser did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                err = self._proc.stderr.read().decode(errors="replace") if (
                    self._proc.stderr and self._proc.poll() is not None) else ""
                raise ProtocolError(f"the browser closed the pipe: {err[-2000:]}")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer (events meanwhile go to ``events``)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise ProtocolError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            self.events.append(answer)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A command to the page."""
        return self.send(method, params, self.session)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    del self.events[i]
                    return event
            self.events.append(self._read_message(deadline))

    # -- what the tests use -------------------------------------------------------------------

    def load(self, url: str) -> None:
        """Open ``url`` and wait until its load event fired."""
        self.events.clear()
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise ProtocolError(f"cannot open {url}: {answer['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        answer = self.call("Runtime.evaluate",
                           {"expression": expression, "returnByValue": True,
                            "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise ProtocolError(f"{expression!r} raised: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the first element ``selector`` matches."""
        box = self.evaluate(
            f"(() => {{const e = document.querySelector({json.dumps(selector)});"
            "if (!e) return null; e.scrollIntoView({block: 'center'});"
            "const r = e.getBoundingClientRect();"
            "return [r.left + Math.min(r.width / 2, 40), r.top + r.height / 2];})()"
        )
        if box is None:
            raise ProtocolError(f"nothing in the page matches {selector!r}")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent",
                      {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                if self.session is not None:
                    os.write(self._to_browser,
                             json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)


def png_colors(png: bytes, *, limit: int = 64) -> set[tuple[int, ...]]:
    """The distinct pixel colours of an 8-bit RGB(A) PNG (up to ``limit`` of them)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            if depth != 8 or color not in (2, 6):
                raise ValueError(f"unsupported PNG (depth {depth}, colour type {color})")
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    colors: set[tuple[int, ...]] = set()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        for x in range(0, stride, channels * 7):  # every 7th pixel: enough to see a page
            colors.add(tuple(line[x:x + channels]))
            if len(colors) >= limit:
                return colors
        prev = line
    return colors
