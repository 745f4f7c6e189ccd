"""`sslpipe bench remote` runs both sides (2 processes over disk and over a local HTTP server) and reports rates and
descriptor counts; no socket stays open in a rank after its loader is gone."""
from __future__ import annotations

from pathlib import Path

from sslpipe.bench.remote import run_remote_bench


def test_bench_remote_reads_both_sides_and_leaks_no_socket(digits_shards: Path) -> None:
    result = run_remote_bench(digits_shards, processes=2, workers=1, batch_size=16, seconds=1.0)
    assert result["disk_images_per_s"] > 0 and result["http_images_per_s"] > 0
    assert [r["rank"] for r in result["http"]] == [0, 1] and all(r["images"] >= 16 for r in result["http"])
    for rank in result["disk"] + result["http"]:
        assert rank["after"]["sockets"] == rank["before"]["sockets"]
    served = result["server_descriptors"]
    assert served["after_close"]["sockets"] == served["before"]["sockets"]
    assert "| HTTP (127.0.0.1) |" in result["table"]
