"""Child processes of the agent are waited for by their event loop, not by a thread each
(deploy_core.agent.child_watcher): on Python 3.11 asyncio's default started a thread per
child.  Real processes, real loops in two threads."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import missing_part

from deploy_core.agent import child_watcher

WAIT = 30.0


async def run(argv: list[str]) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out


def waiting_threads() -> list[str]:
    """The threads asyncio's threaded watcher starts, one per child (``waitpid-N``)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("waitpid-")]


def test_children_are_waited_for_without_a_thread_each_in_any_loop() -> None:
    if not child_watcher._pidfds_work():
        missing_part("this kernel has no pidfd_open (Linux 5.3+)")
    child_watcher.install()
    results: dict[str, list[tuple[int, bytes]]] = {}
    threads_seen: list[list[str]] = []

    async def several(name: str) -> None:
        started = [
            asyncio.ensure_future(run(["/bin/sh", "-c", f"echo {name}-{n}; exit {n}"]))
            for n in range(5)
        ]
        await asyncio.sleep(0)  # all started, none waited for yet
        threads_seen.append(waiting_threads())
        results[name] = await asyncio.gather(*started)

    # One loop in this thread and one in another, at the same time (an agent in a test's or
    # a benchmark's thread): each reads its own children's exits.
    other = threading.Thread(target=asyncio.run, args=(several("other"),))
    other.start()
    asyncio.run(several("main"))
    other.join(WAIT)
    assert not other.is_alive()
    for name in ("main", "other"):
        assert results[name] == [(n, f"{name}-{n}\n".encode()) for n in range(5)]
    assert threads_seen == [[], []]


def test_a_watcher_someone_chose_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    class Theirs(child_watcher.PidfdWatcher):
        pass

    policy = asyncio.get_event_loop_policy()
    monkeypatch.setattr(policy, "_watcher", Theirs(), raising=False)
    child_watcher.install()
    assert type(getattr(policy, "_watcher", None)) is Theirs
