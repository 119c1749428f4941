"""Pull progress: the engine's per-layer events folded into one fraction and one message."""

from __future__ import annotations

from typing import Any

# Share of a layer's progress that is its download; the rest is extraction.
DOWNLOAD_SHARE = 0.8
DONE = {"Pull complete", "Already exists"}
DOWNLOADED = {"Verifying Checksum", "Download complete"}


class PullProgress:
    """Feed it every event of a pull (:meth:`update`); read :attr:`fraction` and
    :meth:`message`.  Layers count equally: the engine announces every layer before it
    reports bytes, so the fraction does not jump back as layers appear."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.layers: dict[str, float] = {}
        self.bytes: dict[str, tuple[int, int]] = {}
        self.digest: str | None = None
        self.status: str | None = None

    def update(self, event: dict[str, Any]) -> None:
        """Take one event: ``{"status": …, "id": layer, "progressDetail": {current, total}}``."""
        status = str(event.get("status", ""))
        if status.startswith("Digest: "):
            self.digest = status.removeprefix("Digest: ").strip()
            return
        if status.startswith("Status: "):
            self.status = status.removeprefix("Status: ").strip()
            return
        layer = event.get("id")
        if not layer or status.startswith("Pulling from"):
            return
        detail = event.get("progressDetail") or {}
        current, total = int(detail.get("current") or 0), int(detail.get("total") or 0)
        done = self.layers.get(layer, 0.0)
        if status in DONE:
            done = 1.0
        elif status in DOWNLOADED:
            done = max(done, DOWNLOAD_SHARE)
        elif status == "Downloading" and total > 0:
            done = max(done, DOWNLOAD_SHARE * min(current / total, 1.0))
            self.bytes[layer] = (current, total)
        elif status == "Extracting" and total > 0:
            done = max(done, DOWNLOAD_SHARE + (1 - DOWNLOAD_SHARE) * min(current / total, 1.0))
        self.layers[layer] = done

    @property
    def fraction(self) -> float:
        """0.0-1.0 over every layer seen so far."""
        if not self.layers:
            return 0.0
        return sum(self.layers.values()) / len(self.layers)

    def message(self) -> str:
        """``pulling repo:tag: 2/5 layers, 12.3/40.0 MB downloaded``."""
        done = sum(1 for v in self.layers.values() if v >= 1.0)
        text = f"pulling {self.ref}: {done}/{len(self.layers)} layers"
        if self.bytes:
            current = sum(c for c, _ in self.bytes.values()) / 1e6
            total = sum(t for _, t in self.bytes.values()) / 1e6
            text += f", {current:.1f}/{total:.1f} MB downloaded"
        return text
