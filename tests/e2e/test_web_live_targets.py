"""The web page's "Live on each target" section: after two deployments of one directory, it
shows the newer one as live; after that one is rolled back, the older one.  Real headless
Chromium (the harness of test_web_page.py), real server and agent processes."""

from __future__ import annotations

from pathlib import Path

from test_web_page import Browser, admin_token, browser, center, sign_in

from deploy_core.testing import DeployCenter

__all__ = ["browser", "center"]  # the harness's fixtures, used here by name


def _live_row(browser: Browser, target: str, deploy_id: str) -> None:
    row = f"document.querySelector('#live-body tr[data-target=\"{target}\"]')"
    browser.wait_for(
        f"{row} && {row}.innerText.includes('{deploy_id}')",
        timeout=30,
        what=f"{deploy_id} live on {target}",
    )


def test_live_section_shows_the_live_deployment_per_target(
    center: DeployCenter, browser: Browser, tmp_path: Path
) -> None:
    app = tmp_path / "site"
    app.mkdir()
    fields = {"workdir": str(app), "rollback": {"strategy": "snapshot", "path": str(app)}}
    first = center.deploy("shell", "web-1", script="echo one > version", **fields)
    assert center.wait(first)["status"] == "success"
    second = center.deploy("shell", "web-1", script="echo two > version", **fields)
    assert center.wait(second)["status"] == "success"

    sign_in(browser, center, admin_token(center))
    target = f"deploy.shell:{app}"
    _live_row(browser, target, second)
    link = f"document.querySelector('#live-body tr[data-target=\"{target}\"] a')"
    assert browser.js(f"{link}.getAttribute('href')") == f"#deploy/{second}"
    assert browser.js("document.getElementById('live-empty').hidden") is True

    undo = center.api.rollback(second)
    assert center.wait(undo["deploy_id"])["status"] == "rolled_back"
    _live_row(browser, target, first)  # refreshed without a reload
    assert (app / "version").read_text() == "one\n"
    assert browser.problems() == []
