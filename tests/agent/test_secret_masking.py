"""Secret values that overlap (one contains another) are each masked whole: no tail of the
longer one is left showing after the shorter one is masked."""

from __future__ import annotations

import json
import time
from pathlib import Path

from deploy_core.agent.context import MASK, DeployContext
from deploy_core.models import DeployCommand
from deploy_core.testing import DeployCenter, RecordingReporter

SHORT, LONG = "abc", "abcdef"
SECRETS = {"SHORT": SHORT, "LONG": LONG}
# The longer secret alone, the shorter alone, the longer inside other text, both glued.
SCRIPT = 'echo "short=$SHORT long=$LONG inside=x${LONG}y glued=$LONG$SHORT"'
MASKED = f"short={MASK} long={MASK} inside=x{MASK}y glued={MASK}{MASK}"


def _context(tmp_path: Path) -> tuple[DeployContext, RecordingReporter]:
    reporter = RecordingReporter()
    command = DeployCommand(
        deploy_id="overlap-1",
        command_type="deploy.shell",
        params={},
        secret_env=SECRETS,
        expires_at=time.time() + 60,
    )
    return DeployContext(command=command, reporter=reporter, data_dir=tmp_path), reporter


def test_mask_hides_a_secret_that_contains_another_whole(tmp_path: Path) -> None:
    ctx, _ = _context(tmp_path)
    masked = ctx.mask(f"short={SHORT} long={LONG} inside=x{LONG}y glued={LONG}{SHORT}")
    assert masked == MASKED
    assert "def" not in masked  # the longer secret's tail


async def test_a_real_scripts_output_is_masked_whole(tmp_path: Path) -> None:
    ctx, reporter = _context(tmp_path)
    result = await ctx.run_script(SCRIPT, timeout=30)
    assert result.exit_code == 0
    assert MASKED in reporter.lines("stdout")
    assert not any("def" in line or SHORT in line for line in reporter.lines())


def test_overlapping_secrets_are_masked_whole_through_the_server(
    deploy_center: DeployCenter,
) -> None:
    deploy_center.start_agent("mask-1")
    deploy_id = deploy_center.deploy("shell", "mask-1", script=SCRIPT, secret_env=SECRETS)
    record = deploy_center.wait(deploy_id)
    assert record["status"] == "success", record["error"]
    lines = [line["line"] for line in deploy_center.api.logs(deploy_id)["lines"]]
    assert MASKED in lines
    assert not any("def" in line or SHORT in line for line in lines)
    assert MASKED in record["result"]["stdout_tail"]
    assert SHORT not in record["result"]["stdout_tail"]


def test_a_multi_line_secret_keeps_its_line_breaks_when_masked_whole(tmp_path: Path) -> None:
    # Read in one chunk, a PEM key printed whole used to become one "***" that swallowed its
    # last line break: the next line of output was glued to it ("***token=...").  Read line
    # by line it gave one "***" per line.  Both now give the same lines.
    key = "-----BEGIN KEY-----\nAAAABBBBCCCC\nDDDDEEEEFFFF\n-----END KEY-----\n"
    reporter = RecordingReporter()
    command = DeployCommand(
        deploy_id="pem-1",
        command_type="deploy.shell",
        params={},
        secret_env={"KEY": key, "TOKEN": "tok-123456"},
        expires_at=time.time() + 60,
    )
    ctx = DeployContext(command=command, reporter=reporter, data_dir=tmp_path)
    whole = ctx.mask(f"key follows\n{key}token=tok-123456\n")
    by_line = "".join(ctx.mask(line) for line in f"key follows\n{key}token=tok-123456\n"
                      .splitlines(keepends=True))  # fmt: skip
    assert whole == by_line == f"key follows\n{MASK}\n{MASK}\n{MASK}\n{MASK}\ntoken={MASK}\n"
    crlf = key.replace("\n", "\r\n")
    assert ctx.mask(f"a\r\n{crlf}b") == f"a\r\n{MASK}\r\n{MASK}\r\n{MASK}\r\n{MASK}\r\nb"
    assert ctx.mask(json.dumps(key)) == f'"{MASK}"'
