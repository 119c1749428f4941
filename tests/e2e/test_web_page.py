"""The web page end to end: real headless Chromium, driven over the DevTools protocol, against
a real server and agent on loopback; and the live socket's token check.

Needs Debian's ``chromium`` (``apt-get install chromium``); without it the browser tests skip
with the reason (fail under ``DEPLOY_CENTER_STRICT=1``).  ``$CHROMIUM`` names another binary.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import missing_part
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from deploy_core.testing import DeployCenter

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--window-size=1400,1000",
]


# --------------------------------------------------------------------------- a small CDP client


class Browser:
    """Headless Chromium with one page, driven over the Chrome DevTools Protocol."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port ({binary})")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._stack = contextlib.ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(
            connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 2**20, open_timeout=10)
        )
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        end = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, end - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (awaiting promises) and return its value."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value.  A page being replaced by a
        navigation meanwhile is waited out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                value = self.js(expression)
            except RuntimeError:  # the execution context went away with its document
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(
            f"page never showed {what or expression} within {timeout}s; it shows:\n"
            + str(self.js("document.body.innerText"))[:3000]
        )

    def goto(self, url: str) -> None:
        """Load ``url`` in a new document and wait until it is complete."""
        self.js("window.__oldDocument = true")
        self.call("Page.navigate", {"url": url})
        self.wait_for(
            f"!window.__oldDocument && location.href.startsWith({json.dumps(url)})"
            " && document.readyState === 'complete'",
            what=f"{url} loaded",
        )

    def click(self, selector: str) -> None:
        """Click the middle of an element with the mouse, as a person would."""
        here = self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " const x = r.x + r.width / 2, y = r.y + r.height / 2;"
            " const hit = document.elementFromPoint(x, y);"
            " return (hit === e || e.contains(hit)) && [x, y]; })()",
            what=f"{selector} clickable",
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": here[0], "y": here[1], "button": "left", "clickCount": 1},
            )

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field, empty it and type ``text`` into it."""
        element = f"document.querySelector({json.dumps(selector)})"
        self.js(f"{element}.focus(); {element}.value = ''")
        self.call("Input.insertText", {"text": text})
        self.wait_for(f"{element}.value === {json.dumps(text)}", what=f"{text!r} in {selector}")

    def screenshot(self, path: Path) -> None:
        """Save the whole page as a PNG."""
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))

    def problems(self) -> list[str]:
        """JavaScript exceptions, console errors and browser log errors (CSP included)."""
        with contextlib.suppress(TimeoutError):
            self.js("0")  # collect what arrived
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def close(self) -> None:
        """Stop the browser and every process it started (its own session): a helper left
        behind would go on writing into the profile while it is being removed."""
        with contextlib.suppress(Exception):
            self._stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break  # the session's group is empty
            time.sleep(0.05)


def chromium_binary() -> str | None:
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).exists() else None)
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("web"))
    try:
        c.start_server()
        c.start_agent("web-1")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def read_token(center: DeployCenter) -> str:
    token: str = center.api.request(
        "POST", "/api/tokens", json={"name": "viewer", "scope": "read"}
    )["token"]
    return token


@contextlib.contextmanager
def open_browser() -> Iterator[Browser]:
    """Headless Chromium on a fresh profile, closed (with all it started) afterwards; a
    missing Chromium is a missing part."""
    binary = chromium_binary()
    if binary is None:
        missing_part("chromium is not installed (apt-get install chromium), or set $CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="dc-chromium-") as profile:
        b = Browser(binary, Path(profile))  # type: ignore[arg-type]
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def browser(center: DeployCenter) -> Iterator[Browser]:
    with open_browser() as b:
        yield b


def admin_token(center: DeployCenter) -> str:
    return (center.server_dir / "admin.token").read_text().strip()


def sign_in(browser: Browser, center: DeployCenter, token: str) -> None:
    browser.goto(center.api.url + "/")
    browser.js("sessionStorage.clear()")
    browser.goto(center.api.url + "/")
    browser.wait_for("!document.getElementById('login').hidden", what="the token form")
    browser.type_into("#token", token)
    browser.click("#login-form button[type=submit]")
    browser.wait_for(
        "document.getElementById('conn').dataset.state === 'live'", what="the live connection"
    )


# --------------------------------------------------------------------------- the page


def test_page_lists_the_client_and_shows_a_deployment_live(
    center: DeployCenter, browser: Browser, tmp_path: Path
) -> None:
    sign_in(browser, center, admin_token(center))
    row = "document.querySelector('#clients-body tr[data-client=\"web-1\"]')"
    browser.wait_for(f"{row} && {row}.dataset.connected === 'true'", what="web-1 connected")
    assert "connected" in browser.js(f"{row}.innerText")
    assert "deploy.shell" in browser.js(f"{row}.innerText")
    assert browser.js("document.getElementById('f-client').value") == "web-1"
    # Nothing below may reload the page: this mark would be lost.
    browser.js("window.__sameDocument = true")
    # Every status the detail view shows, with how many log lines it showed at that moment.
    browser.js(
        "window.__seen = [];"
        "new MutationObserver(() => window.__seen.push([document.getElementById('d-status')"
        ".textContent, document.querySelectorAll('#logs .line').length]))"
        ".observe(document.getElementById('d-status'), {childList: true, characterData: true,"
        " subtree: true});"
    )

    script = "for i in 1 2 3 4; do echo step-$i; sleep 0.4; done; echo careful >&2"
    browser.type_into("#f-script", script)
    browser.type_into("#f-timeout", "30")
    browser.click("#f-submit")
    deploy_id = browser.wait_for(
        "(/^#deploy\\/([0-9a-f]{32})$/.exec(location.hash) || [])[1]", what="the new deployment"
    )
    browser.wait_for(
        "document.getElementById('d-status').textContent === 'success'",
        timeout=30,
        what="status success",
    )
    browser.wait_for(
        "document.getElementById('logs-state').textContent.includes('ended')",
        what="the end of the log stream",
    )

    assert browser.js("window.__sameDocument") is True
    lines = browser.js("[...document.querySelectorAll('#logs .line')].map(e => e.textContent)")
    assert lines == ["step-1\n", "step-2\n", "step-3\n", "step-4\n", "careful\n"]
    assert browser.js("document.querySelector('#logs .line:last-child').dataset.stream") == "stderr"
    seen = browser.js("window.__seen")
    statuses = [status for status, _ in seen]
    assert "script_running" in statuses and statuses[-1] == "success", seen
    # Log lines were on the page while the script still ran: streamed, not read at the end.
    assert any(status == "script_running" and count >= 1 for status, count in seen), seen
    assert browser.js("document.getElementById('d-progress').value") == 100
    history = browser.wait_for(
        "(h => h.at(-1) === 'success' && h)([...document.querySelectorAll("
        "'#history-body tr td:nth-child(2)')].map(e => e.innerText.trim()))",
        what="the whole status history",
    )
    assert history[0] == "pending" and history[-1] == "success", history
    assert history == [row["status"] for row in center.api.history(deploy_id)]
    listed = browser.js(f"document.querySelector('tr[data-deploy-row=\"{deploy_id}\"]').innerText")
    assert "success" in listed and "web-1" in listed
    assert browser.js("document.getElementById('d-rollback').hidden") is True  # none configured

    shot = tmp_path / "web-page.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
    assert browser.problems() == []


def test_rollback_button_rolls_back_a_finished_deployment(
    center: DeployCenter, browser: Browser
) -> None:
    sign_in(browser, center, admin_token(center))
    deploy_id = center.deploy(
        "shell",
        "web-1",
        script='if [ "$DEPLOY_ACTION" = rollback ]; then echo undoing; else echo doing; fi',
        rollback={"strategy": "inline"},
    )
    assert center.wait(deploy_id, timeout=30)["status"] == "success"
    browser.js(f"location.hash = '#deploy/{deploy_id}'")
    browser.wait_for("!document.getElementById('d-rollback').hidden", what="the rollback button")
    browser.js("window.confirm = () => true")  # the operator says yes
    browser.click("#d-rollback")
    rollback_id = browser.wait_for(
        f"(m => m && m[1] !== '{deploy_id}' && m[1])"
        "(/^#deploy\\/([0-9a-f]{32})$/.exec(location.hash))",
        what="the rollback deployment",
    )
    browser.wait_for(
        "document.getElementById('d-status').textContent === 'rolled_back'",
        timeout=30,
        what="the rollback succeeding",
    )
    browser.wait_for(
        "[...document.querySelectorAll('#logs .line')].some(e => e.textContent === 'undoing\\n')",
        what="the rollback's log",
    )
    assert browser.js("document.getElementById('d-rollback-of').innerText") == deploy_id
    assert center.api.get(deploy_id)["rolled_back_by"] == rollback_id
    # The original's row updated live: it now links to its rollback.
    browser.js(f"location.hash = '#deploy/{deploy_id}'")
    browser.wait_for(
        f"document.getElementById('d-rolled-back-by').innerText === '{rollback_id}'",
        what="the rolled-back-by link",
    )
    assert browser.js("document.getElementById('d-rollback').hidden") is True
    assert browser.problems() == []


def test_api_errors_are_shown_as_the_api_wrote_them(
    center: DeployCenter, browser: Browser, read_token: str
) -> None:
    sign_in(browser, center, read_token)
    assert "(read)" in browser.js("document.getElementById('conn').textContent")
    browser.type_into("#f-script", "echo never")
    browser.click("#f-submit")
    browser.wait_for("!document.getElementById('deploy-error').hidden", what="the error")
    shown = browser.js("document.querySelector('#deploy-error .message').textContent")
    with httpx.Client() as http:
        answer = http.post(
            center.api.url + "/api/deploy/shell",
            json={"client_id": "web-1", "script": "echo never"},
            headers={"Authorization": f"Bearer {read_token}"},
        )
    assert answer.status_code == 403
    assert shown == answer.json()["error"]
    where = browser.js("document.querySelector('#deploy-error .where').textContent")
    assert where == "POST /api/deploy/shell → 403"


def test_a_refused_token_returns_to_the_token_form(center: DeployCenter, browser: Browser) -> None:
    browser.goto(center.api.url + "/")
    browser.js("sessionStorage.setItem('deploy-center.token', 'not-a-token')")
    browser.goto(center.api.url + "/")
    browser.wait_for("!document.getElementById('login-error').hidden", what="the refusal")
    message = browser.js("document.getElementById('login-error').innerText")
    assert "4401" in message and "unknown API token" in message
    assert browser.js("sessionStorage.getItem('deploy-center.token')") is None
    assert browser.js("document.getElementById('app').hidden") is True


# --------------------------------------------------------------------------- without a browser


def test_the_page_is_public_and_holds_no_data(center: DeployCenter) -> None:
    with httpx.Client(base_url=center.api.url) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "web-1" not in page.text
        for name in ("app.js", "style.css"):
            assert http.get(f"/static/{name}").status_code == 200
        assert http.get("/api/live").status_code == 401  # plain HTTP still needs a token
        assert http.get("/api/clients").status_code == 401


def live_url(center: DeployCenter) -> str:
    api_url: str = center.api.url
    return api_url.replace("http://", "ws://") + "/api/live"


def closed_with(
    socket_factory: Callable[[], ClientConnection], send: str | None
) -> tuple[int, str]:
    with socket_factory() as ws:
        if send is not None:
            ws.send(send)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=15)
    rcvd = closed.value.rcvd
    assert rcvd is not None
    return int(rcvd.code), str(rcvd.reason)


def test_live_socket_refuses_missing_and_unknown_tokens_with_4401(center: DeployCenter) -> None:
    url = live_url(center)
    cases = [
        (lambda: connect(url), json.dumps({"type": "ping"})),
        (lambda: connect(url), "not json"),
        (lambda: connect(url), json.dumps({"type": "auth", "token": "wrong"})),
        (lambda: connect(url, additional_headers={"Authorization": "Bearer wrong"}), None),
    ]
    for factory, first in cases:
        code, reason = closed_with(factory, first)
        assert code == 4401, (first, reason)
        assert "token" in reason


def test_live_socket_with_a_read_token_pushes_changes(
    center: DeployCenter, read_token: str
) -> None:
    with connect(live_url(center)) as ws:
        ws.send(json.dumps({"type": "auth", "token": read_token}))
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello" and hello["scope"] == "read"
        assert hello["caller"] == "viewer"
        clients = json.loads(ws.recv(timeout=10))
        assert clients["type"] == "clients"
        assert [c["client_id"] for c in clients["clients"] if c["connected"]] == ["web-1"]
        deploy_id = center.deploy("shell", "web-1", script="echo pushed")
        statuses: list[str] = []
        end = time.monotonic() + 30
        while time.monotonic() < end and (not statuses or statuses[-1] != "success"):
            message = json.loads(ws.recv(timeout=max(0.1, end - time.monotonic())))
            if message["type"] == "deployment" and message["record"]["deploy_id"] == deploy_id:
                statuses.append(message["record"]["status"])
        assert statuses[0] == "pending" and statuses[-1] == "success", statuses
        assert "script_running" in statuses
        ws.send(json.dumps({"type": "ping"}))
        while (message := json.loads(ws.recv(timeout=10)))["type"] != "pong":
            pass
    # Programs may send the header instead of the first message.
    with connect(
        live_url(center), additional_headers={"Authorization": f"Bearer {read_token}"}
    ) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_agent_and_server_restarts_show_up_without_reload(
    center: DeployCenter, browser: Browser
) -> None:
    sign_in(browser, center, admin_token(center))
    browser.js("window.__sameDocument = true")
    row = "document.querySelector('#clients-body tr[data-client=\"web-1\"]')"
    center.stop_agent("web-1")
    browser.wait_for(f"{row}.dataset.connected === 'false'", what="web-1 disconnected")
    assert "disconnected" in browser.js(f"{row}.innerText")
    center.start_agent("web-1")
    browser.wait_for(f"{row}.dataset.connected === 'true'", what="web-1 connected again")

    center.stop_server()
    browser.wait_for(
        "document.getElementById('conn').dataset.state === 'lost'", what="the lost connection"
    )
    center.start_server()
    browser.wait_for(
        "document.getElementById('conn').dataset.state === 'live'",
        timeout=30,
        what="the connection back",
    )
    center.wait_connected("web-1")
    browser.wait_for(
        f"{row}.dataset.connected === 'true'", timeout=30, what="web-1 connected after the restart"
    )
    deploy_id = center.deploy("shell", "web-1", script="echo after the restart")
    browser.wait_for(
        f"(r => r && r.innerText.includes('success'))"
        f"(document.querySelector('tr[data-deploy-row=\"{deploy_id}\"]'))",
        timeout=30,
        what="a deployment made after the restart",
    )
    assert browser.js("window.__sameDocument") is True
