"""The server process's collector policy (deploy_core.server.gc_policy): what survives a full
collection is frozen, so the next ones walk only what is new; every THAW_EVERY seconds, or
once enough connections have ended, it all goes back once; closing gives everything back.
Run in a child interpreter, so this test process's own collector is left as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import asyncio, gc, json
    from deploy_core.server.gc_policy import FrozenSurvivors

    class Node:
        def __init__(self):
            self.me = self  # a cycle: only the collector frees it

    async def main():
        loop = asyncio.get_running_loop()
        out = {}
        kept = [Node() for _ in range(20000)]  # long-lived, like connections
        state = {"ended": 0}
        survivors = FrozenSurvivors(
            loop, thaw_every=3600, ended=lambda: state["ended"], open_now=lambda: 1000
        ).install()
        gc.collect()
        await asyncio.sleep(0)  # the freeze runs on the loop, after the collection
        await asyncio.sleep(0)
        out["frozen_after_full"] = gc.get_freeze_count()
        out["in_gen2_after_freeze"] = len(gc.get_objects(2))
        # A cycle among frozen objects that is dropped waits for the thaw ...
        dropped = kept.pop()
        probe = dropped.me
        del dropped
        import weakref
        ref = weakref.ref(probe)
        del probe
        gc.collect()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out["frozen_cycle_alive"] = ref() is not None
        # ... which comes THAW_EVERY after the last one: then the next full collection
        # frees it.
        survivors.thaw_every = 0
        gc.collect()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out["frozen_after_thaw"] = gc.get_freeze_count()
        gc.collect()
        out["cycle_freed_after_thaw"] = ref() is None
        survivors.thaw_every = 3600
        gc.collect()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out["frozen_again"] = gc.get_freeze_count() > 0
        # 199 connections ended: below the 200 that bring a thaw forward; 200: thawed.
        state["ended"] += 199
        gc.collect()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out["frozen_after_199_ended"] = gc.get_freeze_count() > 0
        state["ended"] += 1
        gc.collect()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out["frozen_after_200_ended"] = gc.get_freeze_count()
        out["counts"] = [survivors.full_collections, survivors.freezes, survivors.thaws]
        survivors.close()
        out["frozen_after_close"] = gc.get_freeze_count()
        out["callback_removed"] = survivors._collected not in gc.callbacks
        print(json.dumps(out))
        del kept

    asyncio.run(main())
    """
)


def test_survivors_of_a_full_collection_are_frozen_and_thawed() -> None:
    import json

    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["frozen_after_full"] >= 20000
    # Everything that survived is out of the collector's oldest generation.
    assert out["in_gen2_after_freeze"] < 1000
    assert out["frozen_cycle_alive"] is True
    assert out["frozen_after_thaw"] == 0
    assert out["cycle_freed_after_thaw"] is True
    assert out["frozen_again"] is True
    assert out["frozen_after_199_ended"] is True
    assert out["frozen_after_200_ended"] == 0
    full, freezes, thaws = out["counts"]
    assert full >= 7 and freezes >= 4 and thaws == 2
    assert out["frozen_after_close"] == 0
    assert out["callback_removed"] is True
