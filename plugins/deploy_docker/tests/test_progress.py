"""Pull progress from the events a real engine sends (recorded from dockerd 20.10)."""

from __future__ import annotations

from deploy_docker.progress import PullProgress

FRESH_PULL = [
    {"status": "Pulling from web", "id": "v1"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "a0cf"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "b1d2"},
    {"status": "Downloading", "progressDetail": {"current": 500, "total": 1000}, "id": "a0cf"},
    {"status": "Downloading", "progressDetail": {"current": 1000, "total": 1000}, "id": "a0cf"},
    {"status": "Verifying Checksum", "progressDetail": {}, "id": "a0cf"},
    {"status": "Download complete", "progressDetail": {}, "id": "a0cf"},
    {"status": "Extracting", "progressDetail": {"current": 500, "total": 1000}, "id": "a0cf"},
    {"status": "Pull complete", "progressDetail": {}, "id": "a0cf"},
    {"status": "Already exists", "progressDetail": {}, "id": "b1d2"},
    {"status": "Digest: sha256:a524"},
    {"status": "Status: Downloaded newer image for 127.0.0.1:5000/web:v1"},
]


def test_fraction_rises_through_download_and_extraction_to_one() -> None:
    progress = PullProgress("127.0.0.1:5000/web:v1")
    seen = []
    for event in FRESH_PULL:
        progress.update(event)
        seen.append(progress.fraction)
    assert seen == sorted(seen)
    assert seen[2] == 0.0  # two layers announced, no bytes yet
    assert seen[3] == 0.2  # half of one layer's download: 0.8 * 0.5 / 2
    assert seen[7] == 0.45  # one layer half extracted: (0.8 + 0.2 * 0.5) / 2
    assert seen[-1] == 1.0
    assert progress.digest == "sha256:a524"
    assert progress.status == "Downloaded newer image for 127.0.0.1:5000/web:v1"


def test_message_counts_layers_and_bytes() -> None:
    progress = PullProgress("web:v1")
    for event in FRESH_PULL[:4]:
        progress.update(event)
    assert progress.message() == "pulling web:v1: 0/2 layers, 0.0/0.0 MB downloaded"
    progress.update(
        {
            "status": "Downloading",
            "progressDetail": {"current": 2_500_000, "total": 4_000_000},
            "id": "b1d2",
        }
    )
    assert progress.message() == "pulling web:v1: 0/2 layers, 2.5/4.0 MB downloaded"


def test_an_up_to_date_image_has_no_layers() -> None:
    progress = PullProgress("web:v1")
    progress.update({"status": "Pulling from web", "id": "v1"})
    progress.update({"status": "Status: Image is up to date for web:v1"})
    assert progress.layers == {} and progress.fraction == 0.0
