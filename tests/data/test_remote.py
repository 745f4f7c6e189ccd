"""Shards over HTTP from a real server on 127.0.0.1 (the standard library's threaded server), with faults injected:
a connection dropped mid-shard, 5xx then success, 404, a stall past the read timeout, a shard served truncated or with
flipped bytes. Each ends in retries then success, or the shard skipped and counted, or one error line past
data.max_skipped_shards; never a hang. Remote reading equals local reading sample for sample (both ranks, two workers
each), and a run killed and resumed over HTTP ends with the same weights as an uninterrupted run on disk."""
from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import tiny_export
from safetensors.torch import load_file

from sslpipe.cli import main
from sslpipe.data.remote import Reading
from sslpipe.data.stream import (
    CorruptSampleWarning,
    ShardReadError,
    build_loader,
    count_samples,
    resolve_shards,
)
from sslpipe.engine.trainer import train
from sslpipe.recipes import get_recipe, load_config
from sslpipe.weights.checkpoint import find_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = Reading(retries=2, retry_backoff=0.01, read_timeout=0.5)


class ShardServer:
    """Serves a folder; `faults[name]` = dict(kind, times) injects a fault on the next `times` requests of that file
    (-1: every request): kind "status" (code), "drop" (half the body, then the connection closes), "stall" (no answer
    for `seconds`), "truncate" (the first `keep` bytes, as the whole file), "flip" (bytes inverted at `at`)."""

    def __init__(self, root: Path) -> None:
        self.root, self.faults, self.log = root, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def requests(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.log if path == name]

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.lstrip("/")
        self.log.append((name, h.headers.get("Range")))
        fault = self.faults.get(name)
        kind = None
        if fault is not None and fault.get("times", -1) != 0:
            fault["times"] = fault.get("times", -1) - (fault.get("times", -1) > 0)
            kind = fault["kind"]
        if kind == "status":
            h.send_error(fault["code"])
            return
        if kind == "stall":
            time.sleep(fault["seconds"])
            return
        file = self.root / name
        if not file.is_file():
            h.send_error(404)
            return
        data = file.read_bytes()
        if kind == "truncate":
            data = data[:fault["keep"]]
        if kind == "flip":
            data = (data[:fault["at"]] + bytes(255 - b for b in data[fault["at"]:fault["at"] + 64])
                    + data[fault["at"] + 64:])
        start = int(h.headers["Range"].split("=")[1].rstrip("-")) if h.headers.get("Range") else 0
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        body = data[start:]
        try:
            if kind == "drop":
                h.wfile.write(body[:len(body) // 2])
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(digits_shards: Path) -> Iterator[ShardServer]:
    s = ShardServer(digits_shards)
    yield s
    s.close()


def _key(sample: dict) -> str:
    return sample["key"]


def _batches(spec: str, reading: Reading = FAST, **kw) -> list[list[str]]:
    args = dict(split="train", sample_fn=_key, collate_fn=list, batch_size=16, drop_last=False, shuffle_buffer=32,
                epoch=1, seed=3, reading=reading)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        loader = build_loader(spec, **args)
        out = [list(b) for b in loader]
    _batches.stats = loader.stats
    return out


def _all_keys(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def _without(shards: Path, index: int) -> int:
    """Samples of the train split less those of shard `index`."""
    entries = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"]
    return sum(e["samples"] for e in entries) - entries[index]["samples"]


def test_a_shard_set_by_its_manifest_url_reads_as_on_disk_on_both_ranks(server: ShardServer,
                                                                          digits_shards: Path) -> None:
    manifest = f"{server.url}/manifest.json"
    urls = resolve_shards(manifest)
    assert urls[0] == f"{server.url}/train-000000.tar" and len(urls) == 12
    assert count_samples(manifest) == count_samples(str(digits_shards)) == 1438
    pattern = f"{server.url}/train-{{000000..000011}}.tar"
    seen = []
    for rank in (0, 1):
        local = _batches(str(digits_shards), rank=rank, world_size=2, num_workers=2)
        assert _batches(manifest, rank=rank, world_size=2, num_workers=2) == local
        assert _batches(pattern, rank=rank, world_size=2, num_workers=2) == local
        seen += _all_keys(local)
    assert len(seen) == len(set(seen)) == 1438  # the two ranks' shards are disjoint and cover the set


def _gloo_rank(rank: int, port: int, spec: str, out: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    keys = _all_keys(_batches(spec, rank=dist.get_rank(), world_size=dist.get_world_size(), num_workers=2))
    gathered: list[list[str] | None] = [None, None]
    dist.all_gather_object(gathered, keys)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_gloo_processes_of_two_workers_read_disjoint_shards_that_cover_the_set(server: ShardServer,
                                                                                   digits_shards: Path,
                                                                                   tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "keys.json"
    mp.spawn(_gloo_rank, args=(port, f"{server.url}/manifest.json", str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 1438
    for rank in (0, 1):
        assert ranks[rank] == _all_keys(_batches(str(digits_shards), rank=rank, world_size=2, num_workers=2))


def test_a_dropped_connection_goes_on_at_the_byte_it_stopped(server: ShardServer, digits_shards: Path) -> None:
    server.faults["train-000003.tar"] = {"kind": "drop", "times": 2}
    assert _batches(f"{server.url}/manifest.json") == _batches(str(digits_shards))
    ranges = server.requests("train-000003.tar")
    assert ranges[0] is None and len(ranges) == 3 and all(r.startswith("bytes=") for r in ranges[1:])
    assert _batches.stats["shard_errors"] == 0


def test_5xx_is_retried_with_backoff_then_read(server: ShardServer, digits_shards: Path) -> None:
    server.faults["train-000005.tar"] = {"kind": "status", "code": 503, "times": 2}
    reading = Reading(retries=2, retry_backoff=0.2, read_timeout=5)
    start = time.perf_counter()
    assert _batches(f"{server.url}/manifest.json", reading) == _batches(str(digits_shards))
    assert time.perf_counter() - start >= 0.2 + 0.4  # waited 0.2 s, then 0.4 s
    assert len(server.requests("train-000005.tar")) == 3 and _batches.stats["shard_errors"] == 0


def test_404_is_not_retried_the_shard_is_skipped_and_counted(server: ShardServer, digits_shards: Path) -> None:
    server.faults["train-000002.tar"] = {"kind": "status", "code": 404}
    local = _all_keys(_batches(str(digits_shards)))
    with pytest.warns(CorruptSampleWarning, match=r"train-000002\.tar.*HTTP Error 404"):
        loader = build_loader(f"{server.url}/manifest.json", sample_fn=_key, collate_fn=list, batch_size=16,
                              drop_last=False, reading=FAST)
        remote = _all_keys(list(loader))
    assert set(remote) < set(local) and len(remote) == _without(digits_shards, 2)  # shard 2's samples, nothing else
    assert loader.stats["shard_errors"] == 1 and len(server.requests("train-000002.tar")) == 1


def test_a_stall_past_the_read_timeout_is_retried_then_skipped_never_a_hang(server: ShardServer,
                                                                           digits_shards: Path) -> None:
    server.faults["train-000007.tar"] = {"kind": "stall", "seconds": 1.5}
    start = time.perf_counter()
    keys = _all_keys(_batches(f"{server.url}/manifest.json", Reading(retries=1, retry_backoff=0.01,
                                                                      read_timeout=0.3)))
    assert time.perf_counter() - start < 10
    assert len(keys) == _without(digits_shards, 7) and _batches.stats["shard_errors"] == 1
    assert len(server.requests("train-000007.tar")) == 2  # the first try and one retry


def test_a_truncated_shard_loses_its_tail_or_with_sha256_the_whole_shard(server: ShardServer,
                                                                         digits_shards: Path) -> None:
    size = (digits_shards / "train-000004.tar").stat().st_size
    server.faults["train-000004.tar"] = {"kind": "truncate", "keep": size // 2}
    kept = _all_keys(_batches(f"{server.url}/manifest.json"))
    assert _without(digits_shards, 4) < len(kept) < 1438 and _batches.stats["shard_errors"] == 1  # before the cut
    checked = _all_keys(_batches(f"{server.url}/manifest.json", Reading(retries=1, retry_backoff=0.01,
                                                                         read_timeout=5, verify_sha256=True)))
    assert len(checked) == _without(digits_shards, 4) and _batches.stats["shard_errors"] == 1
    assert len(server.requests("train-000004.tar")) == 1 + 2  # the plain read, then the checked read and its retry


def test_flipped_bytes_are_caught_by_the_sha256_check_before_any_sample(server: ShardServer,
                                                                        digits_shards: Path) -> None:
    server.faults["train-000006.tar"] = {"kind": "flip", "at": 2048}
    plain = _all_keys(_batches(f"{server.url}/manifest.json"))
    assert len(plain) < 1438  # the damaged image no longer decodes (PNG's CRC)
    assert _batches.stats["corrupt_samples"] + _batches.stats["shard_errors"] >= 1
    checked = _all_keys(_batches(f"{server.url}/manifest.json", Reading(retries=0, verify_sha256=True)))
    assert len(checked) == _without(digits_shards, 6)
    assert _batches.stats["shard_errors"] == 1 and _batches.stats["corrupt_samples"] == 0


def test_more_lost_shards_than_allowed_stop_with_the_shard_named(server: ShardServer) -> None:
    server.faults["train-000001.tar"] = {"kind": "status", "code": 500}
    with pytest.raises(ShardReadError, match=r"1 shards lost .*data\.max_skipped_shards=0; the last: shard "
                                             r"http://127\.0\.0\.1:\d+/train-000001\.tar: RemoteReadError: HTTP 500 "
                                             r"Internal Server Error at byte 0, after 2 tries"):
        _batches(f"{server.url}/manifest.json", Reading(retries=1, retry_backoff=0.01, max_skipped_shards=0))


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)


def _simclr(data: str, out: Path, name: str, *extra: str):
    return load_config(RECIPES / "demo_simclr.yaml", [
        f"data.train={data}", f"data.val={data}", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8",
        "data.retry_backoff=0.01", "train.epochs=1", "data.steps_per_epoch=4", "train.checkpoint_every_epochs=0",
        f"output_dir={out}", f"run_name={name}", "eval.every_epochs=0", *extra])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_run_killed_and_resumed_over_http_equals_an_uninterrupted_run_on_disk(server: ShardServer,
                                                                                digits_shards: Path,
                                                                                tmp_path: Path) -> None:
    straight = train(_simclr(str(digits_shards), tmp_path, "disk"))
    AcceleratorState._reset_state(reset_partial_state=True)
    remote = f"{server.url}/manifest.json"
    run = train(_simclr(remote, tmp_path, "http", "train.max_steps=2"))
    server.faults["train-000000.tar"] = {"kind": "drop", "times": 1}  # and a fault on the way
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(_simclr(remote, tmp_path, "http"), resume=str(run))
    a = load_file(str(find_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(find_checkpoint(resumed) / "model.safetensors"))
    assert find_checkpoint(resumed).name == "step_00000004" and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method_recipe", ["demo_simclr.yaml", "demo_u2pl.yaml"])
def test_a_recipe_reads_its_manifest_url_with_the_data_retries(server: ShardServer, tmp_path: Path,
                                                               method_recipe: str) -> None:
    """The epoch length comes from the manifest, the first remote read of a run: it is read with data.retries and
    data.retry_backoff, not the defaults (3 retries, 1 s backoff)."""
    remote = f"{server.url}/manifest.json"
    server.faults["manifest.json"] = {"kind": "status", "code": 503, "times": 5}
    sections = {"demo_u2pl.yaml": [f"u2pl.unlabeled={remote}", "u2pl.unlabeled_split=train"]}
    cfg = load_config(RECIPES / method_recipe, [f"data.train={remote}", "data.train_split=train", "data.retries=6",
                                                 "data.retry_backoff=0.001", "data.steps_per_epoch=null",
                                                 f"output_dir={tmp_path}", *sections.get(method_recipe, [])])
    recipe = get_recipe(cfg.method)(cfg)
    started = time.monotonic()
    assert recipe.steps_per_epoch(1) == 1438 // cfg.data.batch_size  # digits' train split, 1,438 samples
    assert time.monotonic() - started < 3  # the default 1 s backoff would take 1 + 2 + 4 + 8 + 16 s
    assert server.faults["manifest.json"]["times"] == 0 and len(server.requests("manifest.json")) == 6


def test_the_periodic_knn_reads_its_manifest_url_with_the_data_retries(server: ShardServer, tmp_path: Path) -> None:
    """The evaluation during training reads data.train / data.val with the recipe's data.* keys too."""
    from sslpipe.recipes.knn_eval import periodic_knn
    from sslpipe.weights.export import load_backbone

    remote = f"{server.url}/manifest.json"
    server.faults["manifest.json"] = {"kind": "status", "code": 503, "times": 5}
    cfg = load_config(RECIPES / "demo_simclr.yaml", [
        f"data.train={remote}", f"data.val={remote}", "data.retries=6", "data.retry_backoff=0.001",
        "data.num_workers=0", "eval.max_train=64", "eval.max_val=32", f"output_dir={tmp_path}"])
    started = time.monotonic()
    result = periodic_knn(cfg, load_backbone(tiny_export(tmp_path / "export")))
    assert time.monotonic() - started < 20 and server.faults["manifest.json"]["times"] == 0
    assert set(result) == {"knn/top1_k10", "knn/top1_k20"} and 0 <= result["knn/top1_k10"] <= 1


def test_cli_knn_reads_a_manifest_url_and_train_stops_with_one_line(server: ShardServer, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    export = tiny_export(tmp_path / "export")
    out = tmp_path / "knn.json"
    assert main(["knn", str(export), "--data", f"{server.url}/manifest.json", "--k", "5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["k"]["5"]["top1"] > 0.2  # ten classes: chance is 0.1
    server.faults.update({f"train-{i:06d}.tar": {"kind": "status", "code": 503} for i in range(12)})
    capsys.readouterr()
    code = main(["train", str(RECIPES / "demo_simclr.yaml"), f"data.train={server.url}/manifest.json",
                 f"data.val={server.url}/manifest.json", "data.num_workers=0", "data.retries=0",
                 "data.max_skipped_shards=1", f"output_dir={tmp_path}", "run_name=lost", "eval.every_epochs=0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 1 and len(err) == 1 and "2 shards lost" in err[0] and "max_skipped_shards=1" in err[0]
    assert "Traceback" not in err[0]
