"""`sslpipe report` (sslpipe/viz/report.py): the page of a short real run holds every plot and metric, links only to
files beside it (no network), and draws fine-tuning runs and several runs on the same axes."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sslpipe.cli import main
from sslpipe.engine.trainer import train
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
