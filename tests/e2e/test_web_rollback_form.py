"""The web page's "Roll back on failure" control (issue 10 §2): on by default, showing the
default the server applies, and off sends ``"rollback": false`` — real headless Chromium
against a real server (with ``[defaults.rollback]``) and agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# The browser driver and sign-in of the page's own tests.
from test_web_page import Browser, admin_token, open_browser, sign_in

from deploy_core.testing import DeployCenter

CONFIG = '[defaults.rollback."deploy.shell"]\nstrategy = "snapshot"\npath = "{workdir}"\n'


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    root = tmp_path_factory.mktemp("web-rollback")
    (root / "server.toml").write_text(CONFIG)
    c = DeployCenter(root)
    c.server_args = ["--config", str(root / "server.toml")]
    try:
        c.start_server()
        c.start_agent("web-1")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def browser(center: DeployCenter) -> Iterator[Browser]:
    with open_browser() as b:
        yield b


def submit_and_wait(browser: Browser, status: str) -> str:
    browser.js("location.hash = ''")
    browser.click("#f-submit")
    deploy_id: str = browser.wait_for(
        "(/^#deploy\\/([0-9a-f]{32})$/.exec(location.hash) || [])[1]", what="the new deployment"
    )
    browser.wait_for(
        f"document.getElementById('d-status').textContent === '{status}'",
        timeout=60,
        what=f"status {status}",
    )
    return deploy_id


def test_rollback_is_on_by_default_shows_the_default_and_can_be_turned_off(
    center: DeployCenter, browser: Browser, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "config.txt").write_text("old\n")
    sign_in(browser, center, admin_token(center))
    browser.wait_for(
        "document.getElementById('f-rollback-default').textContent.includes('snapshot')",
        what="the server's default in the form",
    )
    assert browser.js("document.getElementById('f-rollback-on').checked") is True
    assert browser.js("document.getElementById('f-rollback-default').textContent") == (
        "default: snapshot"
    )
    assert browser.js("document.getElementById('f-rollback-hint').textContent") == (
        "On failure: snapshot, the server's default for deploy.shell (path from the request's "
        "workdir)."
    )
    browser.type_into("#f-script", "echo new > config.txt; exit 2")
    browser.type_into("#f-workdir", str(app))
    browser.type_into("#f-timeout", "30")

    first = submit_and_wait(browser, "rolled_back")

    assert (app / "config.txt").read_text() == "old\n"
    assert browser.js("document.getElementById('d-plan').textContent") == (
        'snapshot, the server\'s default for deploy.shell ([defaults.rollback."deploy.shell"])'
    )
    assert browser.js("document.getElementById('d-undo').textContent").startswith(
        f"done: {app} restored"
    )
    shot = tmp_path / "rollback-form.png"
    browser.screenshot(shot)
    print(f"screenshot: {shot}")

    browser.click("#f-rollback-on")  # off
    assert 'rollback": false' in browser.js(
        "document.getElementById('f-rollback-hint').textContent"
    )
    second = submit_and_wait(browser, "failed")

    assert second != first
    assert (app / "config.txt").read_text() == "new\n"  # left as the script made it
    assert browser.js("document.getElementById('d-plan').textContent") == (
        "rollback disabled by the request"
    )
    assert center.api.get(second)["request"]["rollback"] is None
    assert browser.problems() == []
