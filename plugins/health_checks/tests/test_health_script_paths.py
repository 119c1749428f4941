"""The ``script`` check's working directory is held to the agent's constraints like every
path a plugin uses: outside ``workdir_roots`` it is refused by name and nothing runs."""

from __future__ import annotations

from pathlib import Path

from deploy_core.agent.constraints import ConstraintPolicy, Constraints
from deploy_core.testing import make_context
from health_checks.script import ScriptCheckParams, probe_script


async def test_a_workdir_outside_the_roots_is_refused_before_anything_runs(
    tmp_path: Path,
) -> None:
    ctx, reporter = make_context(tmp_path / "data")
    ctx.constraints = ConstraintPolicy(Constraints(workdir_roots=[str(tmp_path / "apps")]))
    marker = tmp_path / "ran"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    params = ScriptCheckParams(script=f"touch {marker}\n", workdir=str(outside))

    error = await probe_script(params, ctx)

    assert error == (
        f"refused by constraint workdir_roots: health-check working directory {outside} is "
        f"outside the allowed roots {tmp_path / 'apps'}"
    )
    assert not marker.exists()
    assert any("refused by constraint workdir_roots" in line for line in reporter.lines())

    inside = tmp_path / "apps" / "web"
    inside.mkdir(parents=True)
    ok = ScriptCheckParams(script=f"touch {marker}\n", workdir=str(inside))
    assert await probe_script(ok, ctx) is None
    assert marker.exists()
