"""The cluster key on the command line: ``deployctl cluster key``, ``deployctl server
--cluster-key-file/--join-cluster`` and ``[cluster]`` of its ``--config`` (issue 15 item 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from deploy_core.cli.server_command import cluster_settings, server_config_file
from deploy_core.server.cluster_identity import ClusterSettings, key_id, load_key


def deployctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cluster_key_command_writes_a_private_key_once(tmp_path: Path) -> None:
    out = tmp_path / "cluster.key"
    done = deployctl("cluster", "key", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert key_id(load_key(out)) in done.stdout
    before = out.read_bytes()
    again = deployctl("cluster", "key", "--out", str(out))
    assert again.returncode == 1
    assert "never overwritten" in again.stderr
    assert out.read_bytes() == before
    missing_dir = deployctl("cluster", "key", "--out", str(tmp_path / "no" / "such" / "k"))
    assert missing_dir.returncode == 1 and "cannot write" in missing_dir.stderr


def test_cluster_table_of_the_server_config(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "server.toml"
    conf.parent.mkdir()
    conf.write_text('[cluster]\nkey_file = "cluster.key"\njoin = true\n')
    assert cluster_settings(conf, None, None) == ClusterSettings(
        conf.parent / "cluster.key", join=True
    )
    # The command line wins over the file.
    flag = tmp_path / "other.key"
    assert cluster_settings(conf, flag, False) == ClusterSettings(flag, join=False)
    assert cluster_settings(None, None, None) is None
    assert cluster_settings(None, flag, None) == ClusterSettings(flag, join=False)
    with click.Context(click.Command("server")):
        assert server_config_file(conf, None, (None, None))["cluster"] == ClusterSettings(
            conf.parent / "cluster.key", join=True
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cluster]\nkey = 'x'\n", r"\[cluster\] takes only key_file, join"),
        ("[cluster]\nkey_file = 3\n", "key_file must be a path"),
        ("[cluster]\nkey_file = 'k'\njoin = 'yes'\n", "join must be true or false"),
        ("[cluster]\njoin = true\n", "--join-cluster needs the cluster key"),
        ("cluster = 1\n", r"\[cluster\] takes only"),
    ],
)
def test_bad_cluster_tables_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(text)
    with pytest.raises(click.BadParameter, match=message):
        cluster_settings(conf, None, None)


def test_up_refuses_a_cluster_table(tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text("[cluster]\nkey_file = 'k'\n")
    with pytest.raises(click.BadParameter, match="runs one server on SQLite"):
        server_config_file(conf)


def test_server_takes_the_cluster_table_and_refuses_sqlite(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    assert deployctl("cluster", "key", "--out", str(key)).returncode == 0
    conf = tmp_path / "server.toml"
    conf.write_text('[cluster]\nkey_file = "cluster.key"\n')
    state = tmp_path / "state"
    args = ["server", "--state-dir", str(state), "--api-port", "0", "--quic-port", "0"]
    done = deployctl(*args, "--config", str(conf))
    assert done.returncode == 1
    assert "needs the PostgreSQL database the replicas share" in done.stderr, done.stderr
    assert not state.exists() or not any(state.iterdir())
    join = deployctl(*args, "--join-cluster")
    assert join.returncode == 2 and "needs the cluster key" in join.stderr


def test_server_config_join_reaches_the_server(tmp_path: Path, pg_url: str) -> None:
    key = tmp_path / "cluster.key"
    assert deployctl("cluster", "key", "--out", str(key)).returncode == 0
    conf = tmp_path / "server.toml"
    conf.write_text(f'[cluster]\nkey_file = "{key}"\njoin = true\n')
    state = tmp_path / "state"
    done = deployctl(
        "server", "--state-dir", str(state), "--api-port", "0", "--quic-port", "0",
        "--db", pg_url, "--config", str(conf),
    )  # fmt: skip
    assert done.returncode == 1
    assert "no cluster identity is published" in done.stderr, done.stderr
    assert not any(state.iterdir())


@pytest.mark.parametrize(
    "value",
    ["http://a.example", "a.example:8470", "a b", "0.0.0.0", "::", "-a.example", "a/b", ""],
)
def test_advertise_host_takes_a_host_only(tmp_path: Path, value: str) -> None:
    done = deployctl("server", "--state-dir", str(tmp_path / "s"), "--advertise-host", value)
    assert done.returncode == 2, done.stderr
    assert "--advertise-host" in done.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_advertise_host_accepts_names_and_addresses() -> None:
    from deploy_core.cli.server_command import check_advertise_host

    assert check_advertise_host("deploy-a.internal") == "deploy-a.internal"
    assert check_advertise_host("10.0.0.11") == "10.0.0.11"
    assert check_advertise_host("[::1]") == "::1"
    assert check_advertise_host(None) is None


@pytest.mark.parametrize("value", ["0", "2.9", "601", "soon", "-5"])
def test_lease_seconds_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    done = deployctl("server", "--state-dir", str(tmp_path / "s"), "--lease-seconds", value)
    assert done.returncode == 2, done.stderr
    assert "--lease-seconds" in done.stderr
    assert not (tmp_path / "s").exists()


def test_lease_seconds_reaches_the_duty_leases(tmp_path: Path, pg_url: str) -> None:
    import json
    import time

    import httpx

    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy_core.cli", "server", "--state-dir", str(state),
         "--api-port", "0", "--quic-port", "0", "--db", pg_url, "--lease-seconds", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while not (state / "server.json").exists() and time.monotonic() < end:
            time.sleep(0.1)
        info = json.loads((state / "server.json").read_text())
        token = (state / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        view = httpx.get(f"{info['api_url']}/api/cluster", headers=headers, timeout=30).json()
        watchdog = {d["duty"]: d for d in view["duties"]}["watchdog"]
        expires = watchdog["expires_at"].rstrip("Z")
        import datetime as dt

        left = dt.datetime.fromisoformat(expires).replace(tzinfo=dt.UTC).timestamp()
        assert 0 < left - time.time() <= 4.5  # a 15 s lease would show up to 15 s left
    finally:
        proc.terminate()
        proc.wait(30)
