"""deploy.tar's parameters and the release strategy's: what the API accepts, normalises and
refuses (with the field named)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deploy_tar.params import LimitOverrides, ReleaseParams, TarParams
from deploy_tar.rules import DEFAULT_LIMITS, ExtractLimits

SHA = "ab" * 32


def test_defaults() -> None:
    params = TarParams.model_validate({"artifact": SHA, "target_dir": "/srv/app"})
    assert params.install_script is None and params.env == {}
    assert (params.keep_releases, params.timeout) == (5, 600.0)
    assert params.limits.to_limits() == DEFAULT_LIMITS
    assert ReleaseParams.model_validate({"strategy": "release"}).start is None


def test_paths_and_hash_are_normalised() -> None:
    params = TarParams.model_validate(
        {
            "artifact": " " + SHA.upper() + "\n",
            "target_dir": "/srv//app/./",
            "install_script": "./scripts//install.sh",
        }
    )
    assert params.artifact == SHA
    assert params.target_dir == "/srv/app"
    assert params.install_script == "scripts/install.sh"


@pytest.mark.parametrize(
    ("fields", "where", "text"),
    [
        ({"artifact": "abc"}, "artifact", "pattern"),
        ({"artifact": "g" * 64}, "artifact", "pattern"),
        ({"target_dir": "srv/app"}, "target_dir", "must be an absolute path"),
        ({"target_dir": "/"}, "target_dir", "'/' cannot be a target directory"),
        ({"target_dir": "//./"}, "target_dir", "'/' cannot be a target directory"),
        ({"target_dir": "/srv/../etc"}, "target_dir", "must not contain '..'"),
        ({"target_dir": "/srv/a\x00b"}, "target_dir", "NUL"),
        ({"install_script": "/bin/sh"}, "install_script", "relative to the package root"),
        ({"install_script": "../x.sh"}, "install_script", "must stay inside the package"),
        ({"install_script": "./"}, "install_script", "names no file"),
        ({"env": {"1X": "y"}}, "env", "invalid environment variable name"),
        ({"env": {"RELEASE_DIR": "/tmp"}}, "env", "set by deploy.tar itself"),
        ({"env": {"X": "a\x00"}}, "env", "NUL"),
        ({"keep_releases": 0}, "keep_releases", "greater than or equal to 1"),
        ({"limits": {"max_members": 10_000_000}}, "limits.max_members", "less than or equal"),
        ({"limits": {"max_ratio": 0.5}}, "limits.max_ratio", "greater than or equal to 1"),
        ({"limits": {"max_files": 3}}, "limits.max_files", "Extra inputs"),
        ({"timeout": 0}, "timeout", "greater than 0"),
        ({"script": "x"}, "script", "Extra inputs"),
    ],
)
def test_bad_parameters_name_the_field(fields: dict[str, Any], where: str, text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TarParams.model_validate({"artifact": SHA, "target_dir": "/srv/app", **fields})
    errors = caught.value.errors()
    assert [".".join(str(p) for p in e["loc"]) for e in errors] == [where]
    assert text in errors[0]["msg"]


def test_limit_overrides_replace_only_what_they_name() -> None:
    limits = LimitOverrides(max_members=10, max_ratio=50).to_limits()
    assert limits == ExtractLimits(
        max_members=10,
        max_total_bytes=DEFAULT_LIMITS.max_total_bytes,
        max_member_bytes=DEFAULT_LIMITS.max_member_bytes,
        max_ratio=50,
        max_path_length=DEFAULT_LIMITS.max_path_length,
        max_depth=DEFAULT_LIMITS.max_depth,
    )


def test_release_start_script_stays_inside_the_release() -> None:
    with pytest.raises(ValidationError, match="must stay inside the package"):
        ReleaseParams.model_validate({"strategy": "release", "start": "../../bin/evil"})
    with pytest.raises(ValidationError, match="strategy"):
        ReleaseParams.model_validate({"strategy": "inline"})
