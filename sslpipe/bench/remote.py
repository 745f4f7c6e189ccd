"""Remote loader benchmark: the same shards read over HTTP from a local server and from disk, side by side.

`processes` loader processes (ranks of one world) with `workers` DataLoader workers each read and decode (no crops:
what differs between the two is I/O) for `seconds`; the rate is images/s summed over the ranks. The HTTP server is the
standard library's threaded server in this process, on 127.0.0.1, so the figure is sslpipe's HTTP client and
protocol cost, not a network's. Open file descriptors and sockets are counted in this process (the server's side)
and in each rank (the client's side) before and after: a leak shows as a difference.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import stat
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from sslpipe.data.stream import build_loader


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def open_descriptors() -> dict[str, int]:
    """This process's open file descriptors, and how many of them are sockets (Linux /proc)."""
    fds = os.listdir("/proc/self/fd")
    sockets = 0
    for fd in fds:
        try:
            sockets += stat.S_ISSOCK(os.stat(f"/proc/self/fd/{fd}").st_mode)
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return {"fds": len(fds), "sockets": sockets}


def _image_size(raw: dict) -> int:
    return raw["image"].size[0]


def _rank(spec: str, rank: int, world: int, workers: int, batch_size: int, seconds: float, out: Any) -> None:
    try:
        _read_for(spec, rank, world, workers, batch_size, seconds, out)
    except Exception as err:  # noqa: BLE001 - handed to the parent, which raises it with the rank named
        out.put({"rank": rank, "error": f"{type(err).__name__}: {err}"})


def _read_for(spec: str, rank: int, world: int, workers: int, batch_size: int, seconds: float, out: Any) -> None:
    torch.set_num_threads(1)
    before = open_descriptors()
    loader = build_loader(spec, sample_fn=_image_size, collate_fn=len, batch_size=batch_size, num_workers=workers,
                          rank=rank, world_size=world, num_batches=1 << 30, shuffle_buffer=64)
    images, start = 0, time.perf_counter()
    for n in loader:
        images += n
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    del loader, n
    time.sleep(0.5)  # worker processes exit and their pipes close
    out.put({"rank": rank, "images": images, "seconds": elapsed, "before": before, "after": open_descriptors()})


def _run(spec: str, processes: int, workers: int, batch_size: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(spec, r, processes, workers, batch_size, seconds, out))
             for r in range(processes)]
    for p in procs:
        p.start()
    ranks = sorted((out.get(timeout=seconds + 600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    failed = [f"rank {r['rank']}: {r['error']}" for r in ranks if "error" in r]
    if failed:
        raise RuntimeError(f"bench remote over {spec}: " + "; ".join(failed))
    return {"images_per_s": sum(r["images"] / r["seconds"] for r in ranks), "ranks": ranks}


def run_remote_bench(shards: str | Path, *, processes: int = 2, workers: int = 2, batch_size: int = 64,
                     seconds: float = 60.0) -> dict[str, Any]:
    """Images/s of `processes` x `workers` loaders over `shards` on disk and over HTTP, and descriptor counts."""
    shards = Path(shards)
    before = open_descriptors()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(shards)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        disk = _run(str(shards), processes, workers, batch_size, seconds)
        http = _run(f"http://127.0.0.1:{server.server_port}/manifest.json", processes, workers, batch_size, seconds)
        time.sleep(0.5)
        serving = open_descriptors()
    finally:
        server.shutdown()
        server.server_close()
    result = {"shards": str(shards), "processes": processes, "workers": workers, "seconds": seconds,
              "disk_images_per_s": disk["images_per_s"], "http_images_per_s": http["images_per_s"],
              "http_over_disk": http["images_per_s"] / disk["images_per_s"],
              "server_descriptors": {"before": before, "after_runs": serving, "after_close": open_descriptors()},
              "disk": disk["ranks"], "http": http["ranks"]}
    result["table"] = format_table(result)
    return result


def format_table(r: dict[str, Any]) -> str:
    leaks = [f"rank {x['rank']} ({name}): fds {x['before']['fds']} -> {x['after']['fds']}, sockets "
             f"{x['before']['sockets']} -> {x['after']['sockets']}" for name in ("disk", "http") for x in r[name]]
    s = r["server_descriptors"]
    return "\n".join([
        f"{r['processes']} processes x {r['workers']} workers, {r['seconds']:.0f} s each, decode only",
        "| source | images/s | ratio |", "|---|---|---|",
        f"| disk | {r['disk_images_per_s']:.0f} | 1.00 |",
        f"| HTTP (127.0.0.1) | {r['http_images_per_s']:.0f} | {r['http_over_disk']:.2f} |",
        *leaks,
        (f"this process (server): fds {s['before']['fds']} -> {s['after_runs']['fds']} after the runs, sockets "
         f"{s['before']['sockets']} -> {s['after_runs']['sockets']} (its listening socket is one), sockets "
         f"{s['after_close']['sockets']} once it is closed")])
