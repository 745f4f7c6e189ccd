"""`sslpipe report` (sslpipe/viz/report.py): the page of a short real run holds every plot and metric, links only to
files beside it (no network), and draws fine-tuning runs and several runs on the same axes."""
from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sslpipe.cli import main
from sslpipe.engine.trainer import train
from sslpipe.metrics_log import RESUMED
from sslpipe.recipes import load_config
from sslpipe.viz.report import read_run, write_report

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Page(HTMLParser):
    """Every tag and attribute of a page, and the images with their alt text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.images: dict[str, str] = {}
        self.ids: list[str] = []
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append(tag)
        self.attrs += [(k, v or "") for k, v in attrs]
        if tag == "img":
            self.images[values["src"]] = values.get("alt", "")
        if "id" in values:
            self.ids.append(values["id"])
        if tag == "a":
            self.links.append(values.get("href", ""))


def check_self_contained(index: Path) -> Page:
    """No script, style sheet, font or anything fetched from elsewhere; every image beside the page; every link an
    anchor of the page."""
    text = index.read_text()
    page = Page(text)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in text and "@import" not in text and "@font-face" not in text
    assert not [v for _, v in page.attrs if "://" in v or v.startswith("//")]
    assert page.images
    for src in page.images:
        assert (index.parent / src).is_file(), f"broken image link {src}"
        Image.open(index.parent / src).verify()
    assert all(link.startswith("#") and link[1:] in page.ids for link in page.links)
    return page


def test_report_of_a_short_dino_run_holds_every_plot(digits_shards: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    overrides = [f"data.train={digits_shards}", f"data.val={digits_shards}", "data.batch_size=8",
                 "data.num_workers=0", "data.steps_per_epoch=1", "train.epochs=2", "train.log_every=1",
                 "train.health_every=1", "eval.every_epochs=1", "eval.knn_k=[5]", "eval.max_train=100",
                 "eval.max_val=40", f"output_dir={tmp_path}", "run_name=dino"]
    run = train(load_config(RECIPES / "demo_dino.yaml", overrides), overrides_text=" ".join(overrides))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records if "event" not in r for k, v in r.items()
              if isinstance(v, (int, float)) and k not in ("step", "epoch", "time", "world_size")}
    for name in ("teacher", "student"):  # the embedding health metrics are logged with the others
        values = [r[f"rankme/{name}"] for r in records if f"rankme/{name}" in r]
        assert len(values) == 2 and all(1.0 <= v <= 16 for v in values)  # batch 8 x 2 global crops: rank <= 16
        assert all(0 < r[f"embed_std/{name}"] < 1 for r in records if f"embed_std/{name}" in r)

    index = write_report([run])
    assert index == run / "report" / "index.html"
    page = check_self_contained(index)
    plots = {src: alt for src, alt in page.images.items() if not src.startswith("run0/")}
    assert set(plots) == {"losses.png", "schedules.png", "knn.png", "health.png", "throughput.png"}
    drawn = {key for alt in plots.values() for key in alt.split(": ", 1)[1].split(", ")}
    assert logged <= drawn, f"metrics without a plot: {logged - drawn}"
    assert {"loss", "lr", "weight_decay", "momentum", "teacher_temp", "knn/top1_k5", "rankme/teacher",
            "rankme/student", "embed_std/teacher", "embed_std/student", "images_per_s"} <= drawn
    text = index.read_text()
    assert "eval.every_epochs=1" in text and "method: dino" in text  # the command and the resolved config
    assert all(key in text for key in logged)  # and the table of last values


def write_finetune_run(root: Path, name: str, miou: list[float], pictures: bool = True) -> Path:
    run = root / name
    (run / "predictions").mkdir(parents=True)
    config = {"method": "finetune_mask2former", "run_name": name, "data": {"train": "x", "batch_size": 4},
              "model": {"init_from": "runs/demo/pretrain/export/teacher"}}
    (run / "config.yaml").write_text("# overrides: train.epochs=2\n" + yaml.safe_dump(config))
    lines = []
    for step in range(1, 5):
        lines.append({"step": step, "epoch": step / 2, "loss": 10.0 / step, "lr": 1e-3, "weight_decay": 0.05,
                      "momentum": 0.996, "teacher_temp": 0.04, "images_per_s": 9.0, "world_size": 1,
                      "gt_masks": 2.5, "time": 100.0 + step})
        if step % 2 == 0:
            lines.append({"step": step, "epoch": step // 2, "mIoU": miou[step // 2 - 1], "iou/cat": 0.1,
                          "bbox/APl": -1.0, "time": 100.5 + step})
    lines.append({"step": 2, "epoch": 1.0, "loss": 7.0, "lr": 1e-3, "time": 107.0})  # resumed: step 2 again
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + '{"step": 5, "epo')  # a last line cut by a crash
    if pictures:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(run / "predictions" / "epoch_001.png")
    return run


def test_finetune_runs_on_the_same_axes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_finetune_run(tmp_path / "seed0", "m2f", [0.1, 0.2])
    b = write_finetune_run(tmp_path / "seed1", "m2f", [0.15, 0.25], pictures=False)
    run = read_run(a)
    assert run.points("loss") == ([0.5, 1.0, 1.5, 2.0], [10.0, 7.0, 10 / 3, 2.5])  # the resumed step's value wins
    assert run.overrides == "train.epochs=2"
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    index = tmp_path / "cmp" / "index.html"
    assert f"wrote {index}" in capsys.readouterr().out
    page = check_self_contained(index)
    plots = {src: alt for src, alt in page.images.items() if src.endswith(".png") and "/" not in src}
    assert set(plots) == {"losses.png", "schedules.png", "throughput.png", "evaluation.png", "other.png"}
    assert "mIoU" in plots["evaluation.png"] and "bbox/APl" not in plots["evaluation.png"]  # COCO's -1: no objects
    assert "momentum" not in plots["schedules.png"]  # no teacher in fine-tuning
    assert "gt_masks" in plots["other.png"]
    assert "run0/predictions/epoch_001.png" in page.images  # the overlays beside the page
    text = index.read_text()
    assert "seed0/m2f" in text and "seed1/m2f" in text  # same run names: told apart by their parents
    assert "iou/cat" in text and "0.25" in text  # per-class IoU and the last mIoU in the table of last values
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def write_pretraining_run(run: Path, records: list[dict], every_epochs: int = 1) -> Path:
    """A DINOv2 run directory of 4 steps per epoch with these metrics.jsonl records (none: no metrics.jsonl)."""
    run.mkdir(parents=True)
    config = {"method": "dinov2", "data": {"batch_size": 16, "steps_per_epoch": 4},
              "eval": {"every_epochs": every_epochs}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if records:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def table(text: str, anchor: str) -> list[list[str]]:
    """The rows (header first) of the page's table under `anchor`, their cells unescaped."""
    part = text.split(f"id='{anchor}'")[1].split("</table>")[0]
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", part)]


def test_a_rolled_back_run_shows_only_its_current_trajectory(tmp_path: Path) -> None:
    """Trajectory A logs steps 2-8 (kNN at 4 and 8); the run is rolled back to step 4 with another lr and stops at
    step 5. A's steps 6 and 8, its step-8 kNN and its step-8 event are not the run's any more."""
    line = lambda step, loss, lr: {"step": step, "epoch": step / 4, "loss": loss, "lr": lr,  # noqa: E731
                                   "time": 100.0 + step}
    records = [line(2, 9.5, 1e-5), line(4, 9.2, 2e-5), {"step": 4, "epoch": 1, "knn/top1_k20": 0.31},
               line(6, 8.98, 2.6e-5), line(8, 8.888, 2.608e-05), {"step": 8, "epoch": 2, "knn/top1_k20": 0.3},
               {"step": 8, "event": "loader skipped", "corrupt_samples": 0},
               {"step": 4, "event": RESUMED, "checkpoint": "rb/checkpoints/step_00000004"}, line(5, 9.037, 1e-3)]
    run_dir = write_pretraining_run(tmp_path / "rb", records)
    run = read_run(run_dir)
    assert run.points("loss") == ([0.5, 1.0, 1.25], [9.5, 9.2, 9.037])
    assert run.last("knn/top1_k20") == 0.31 and run.last("lr") == 1e-3
    text = write_report([run_dir]).read_text()
    summary = {row[0]: row[1:] for row in table(text, "summary")}
    assert summary["steps / epochs logged"] == ["5 / 1.25"]
    assert summary["lines of trajectories a resume replaced (not shown)"] == ["4"]
    assert summary["last loss"] == ["9.037"] and summary["last knn/top1_k20"] == ["0.31"]
    last = {row[0]: row[1:] for row in table(text, "last")}
    assert last["loss"] == ["9.037"] and last["lr"] == ["0.001"] and last["knn/top1_k20"] == ["0.31"]
    assert table(text, "events") == [["run", "step", "event", "details"],  # A's step-8 event is gone
                                     ["rb", "4", RESUMED, '{"checkpoint": "rb/checkpoints/step_00000004"}']]


def test_the_knn_note_says_why_no_probe_was_logged(tmp_path: Path) -> None:
    """eval.every_epochs=1 stopped at step 3 of 4 and one that crashed before its first line: no probe yet, not
    "set it"; eval.every_epochs=0: set it."""
    lines = [{"step": s, "epoch": s / 4, "loss": 9.0, "time": 100.0 + s} for s in (1, 2, 3)]
    half = write_pretraining_run(tmp_path / "half", lines)
    crashed = write_pretraining_run(tmp_path / "crashed", [], every_epochs=2)
    off = write_pretraining_run(tmp_path / "off", lines, every_epochs=0)
    text = html.unescape(write_report([half, crashed, off], tmp_path / "cmp").read_text())
    note = text.split("id='knn'")[1].split("<h2")[0]
    items = re.findall(r"<li>(.*?)</li>", note)
    assert items == [
        "half: no evaluation logged yet: the run's lines end at epoch 0.75; the first probe runs at the end of "
        "epoch 1 (eval.every_epochs=1).",
        "crashed: no evaluation logged yet: the run logged no training line; the first probe runs at the end of "
        "epoch 2 (eval.every_epochs=2).",
        "off: eval.every_epochs is 0 (off); set it to N to probe every N epochs during training."]
    for run in (half, crashed):
        assert "set it" not in write_report([run]).read_text()
