"""Open local HTML pages in headless Chromium: a full-page screenshot, the console's errors and
every request the page made (a self-contained page makes none beyond its own data: URIs).

  python -m iqa_jax.analysis.browser PAGE.html --png SHOT.png [--width 1280]

Talks the DevTools protocol over --remote-debugging-pipe (fds 3 and 4, NUL-terminated JSON), so
no port is opened and one browser start serves any number of pages.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from iqa_jax import cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
  return next((p for p in map(shutil.which, BROWSERS) if p), None)


@dataclasses.dataclass
class PageView:
  png: bytes                  # the full page, as drawn
  errors: list[str]           # console errors, uncaught exceptions, failed loads
  requests: list[str]         # URLs the page asked for, besides itself
  values: dict                # the page's answers to the `evaluate` expressions


class Browser:
  """One headless Chromium; `open(path)` loads a page in a fresh tab and returns a PageView."""

  def __init__(self, binary: str | None = None, timeout: float = 30.0):
    binary = binary or find_browser()
    if not binary:
      raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    self.timeout = timeout
    self._profile = tempfile.mkdtemp(prefix="iqa_chromium_")
    import fcntl
    to_browser, self._send_fd = os.pipe()
    self._recv_fd, from_browser = os.pipe()
    # Above 4, so the shell's redirections onto 3 and 4 never clobber the other end.
    to_browser, from_browser = (_move_above(fd, 10, fcntl) for fd in (to_browser, from_browser))
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--remote-debugging-pipe", f"--user-data-dir={self._profile}", "about:blank"]
    # The protocol wants the browser's fds 3 (it reads) and 4 (it writes).
    shell = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
    self._proc = subprocess.Popen(["bash", "-c", shell, binary, *args],
                                  pass_fds=(to_browser, from_browser),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_browser)
    os.close(from_browser)
    self._buf = b""
    self._id = 0
    self._events: list[dict] = []

  def _send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params or {}}
    if session:
      msg["sessionId"] = session
    os.write(self._send_fd, json.dumps(msg).encode() + b"\0")
    want = self._id
    deadline = time.monotonic() + self.timeout
    while True:
      reply = self._read(deadline)
      if reply.get("id") == want:
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})
      self._events.append(reply)

  def _read(self, deadline: float) -> dict:
    import select
    while b"\0" not in self._buf:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
        raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
      chunk = os.read(self._recv_fd, 1 << 20)
      if not chunk:
        raise RuntimeError("Chromium closed the DevTools pipe")
      self._buf += chunk
    msg, self._buf = self._buf.split(b"\0", 1)
    return json.loads(msg)

  def _wait_event(self, method: str, session: str) -> None:
    deadline = time.monotonic() + self.timeout
    while not any(e.get("method") == method and e.get("sessionId") == session
                  for e in self._events):
      self._events.append(self._read(deadline))

  def open(self, path: str | Path, width: int = 1280, evaluate: dict | None = None) -> PageView:
    """Loads `path`, waits for its load event, and returns what the page drew and said."""
    url = Path(path).resolve().as_uri()
    target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = self._send("Target.attachToTarget", {"targetId": target,
                                                   "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
      self._send(f"{domain}.enable", session=session)
    self._send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 800,
                                                      "deviceScaleFactor": 1, "mobile": False},
               session=session)
    self._events = []
    self._send("Page.navigate", {"url": url}, session=session)
    self._wait_event("Page.loadEventFired", session)
    values = {k: self._send("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                            session=session)["result"].get("value")
              for k, expr in (evaluate or {}).items()}
    height = self._send("Runtime.evaluate", {
        "expression": "document.documentElement.scrollHeight", "returnByValue": True},
        session=session)["result"]["value"]
    self._send("Emulation.setDeviceMetricsOverride", {"width": width, "height": int(height),
                                                      "deviceScaleFactor": 1, "mobile": False},
               session=session)
    png = base64.b64decode(self._send("Page.captureScreenshot", {"format": "png"},
                                      session=session)["data"])
    self._send("Target.closeTarget", {"targetId": target})
    events = [e for e in self._events if e.get("sessionId") == session]
    return PageView(png, _errors(events), _requests(events, url), values)

  def close(self) -> None:
    try:
      self._send("Browser.close")
    except (RuntimeError, TimeoutError, OSError):
      pass
    try:
      self._proc.wait(10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    for fd in (self._send_fd, self._recv_fd):
      os.close(fd)
    shutil.rmtree(self._profile, ignore_errors=True)

  def __enter__(self) -> Browser:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _move_above(fd: int, low: int, fcntl) -> int:
  moved = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
  os.close(fd)
  return moved


def _errors(events: list[dict]) -> list[str]:
  out = []
  for e in events:
    p = e.get("params", {})
    if e.get("method") == "Runtime.exceptionThrown":
      d = p["exceptionDetails"]
      out.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
    elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
      out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
    elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
      out.append(p["entry"]["text"])
  return out


def _requests(events: list[dict], url: str) -> list[str]:
  return [e["params"]["request"]["url"] for e in events
          if e.get("method") == "Network.requestWillBeSent"
          and e["params"]["request"]["url"] != url
          and not e["params"]["request"]["url"].startswith("data:")]


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m iqa_jax.analysis.browser", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("page")
  ap.add_argument("--png", required=True)
  ap.add_argument("--width", type=int, default=1280)
  a = ap.parse_args(argv)
  try:
    with Browser() as browser:
      view = browser.open(a.page, a.width)
  except (FileNotFoundError, RuntimeError, TimeoutError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  Path(a.png).write_bytes(view.png)
  for line in view.errors:
    print(f"console error: {line}", file=sys.stderr)
  for url in view.requests:
    print(f"request: {url}", file=sys.stderr)
  print(f"png: {a.png}")
  return 1 if view.errors or view.requests else 0


if __name__ == "__main__":
  cli.run(main)
