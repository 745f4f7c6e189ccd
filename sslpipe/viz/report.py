"""`sslpipe report`: one run, or several on the same axes, as a static page that needs no server and no network.

Everything is read from each run directory: `metrics.jsonl` (the trainer's log lines, the periodic evaluations and
the events) and `config.yaml` (the resolved recipe, with the command-line overrides in its first line). The page is
`index.html` with its PNGs beside it: inline CSS, no script, no font or style sheet fetched from anywhere, so it opens
from a cluster's file system in any browser. Curves are drawn against epochs (a fraction for the training lines), so
runs with different batch sizes or process counts line up. Sections: losses (every term), schedules (lr, weight
decay, and the teacher's momentum and temperature for methods with one), kNN, health (entropies, RankMe, embedding
std), throughput, evaluation (mIoU, box / mask AP), any other metric logged, the last value of every metric, events,
prediction overlays (`RUN/predictions/*.png`) and other pictures of the run, and each run's config and command.
Only the run's current trajectory is shown (`sslpipe.metrics_log`): lines written before a resume with a step after
its checkpoint's (the steps a killed run logs again, or a trajectory abandoned by a roll-back to an older checkpoint)
are left out, and the Summary counts them. A key logged twice at one step keeps its last value.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from sslpipe.config.loading import load_yaml
from sslpipe.losses.health import EMBEDDING_PREFIXES, HEALTH_KEYS
from sslpipe.metrics_log import current_trajectory, read_records
from sslpipe.viz.figures import pyplot, save_figure

_NOT_SERIES = ("step", "epoch", "time", "world_size")
# the teacher's schedules: logged only by methods with a teacher, but by every method of sslpipe 0.1
_TEACHER_SCHEDULES = ("momentum", "teacher_temp", "teacher_patch_temp", "last_layer_frozen")
_SUPERVISED = ("supervised_seg", "u2pl")  # segmentation methods: evaluated by mIoU, not kNN
_TEACHERLESS = ("simclr", *_SUPERVISED)  # methods (besides finetune_*) that ignore the teacher schedules


@dataclass
class RunLog:
    """What a report reads from one run directory."""

    path: Path
    label: str
    config: dict[str, Any]
    config_text: str
    series: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)  # key -> step -> (epoch, value)
    events: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    world_size: int | None = None
    replaced: int = 0  # records of trajectories a resume replaced (not shown)

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def overrides(self) -> str | None:
        first = self.config_text.splitlines()[0] if self.config_text else ""
        return first.removeprefix("# overrides:").strip() if first.startswith("# overrides:") else None

    def points(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of one metric, in step order."""
        ordered = sorted(self.series.get(key, {}).items())
        return [e for _, (e, _) in ordered], [v for _, (_, v) in ordered]

    def last(self, key: str) -> float | None:
        values = self.points(key)[1]
        return values[-1] if values else None


def _number(value: Any) -> float | None:
    """A logged value as a float (JSON has no NaN/inf: the writer stores them as strings), None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def read_run(path: str | Path, label: str | None = None) -> RunLog:
    """Read `metrics.jsonl` and `config.yaml` of a run directory: the current trajectory's records only (a line cut
    by a crash is skipped, `sslpipe.metrics_log`)."""
    path = Path(path)
    metrics, config = path / "metrics.jsonl", path / "config.yaml"
    if not metrics.is_file() and not config.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has neither metrics.jsonl nor config.yaml")
    config_text = config.read_text() if config.is_file() else ""
    run = RunLog(path=path, label=label or path.name, config=(load_yaml(config_text) or {}) if config_text else {},
                 config_text=config_text)
    read = read_records(metrics) if metrics.is_file() else []
    records = current_trajectory(read)
    run.replaced = len(read) - len(records)
    for record in records:
        if isinstance(record.get("time"), (int, float)):
            run.times.append(float(record["time"]))
        if "event" in record:
            run.events.append(record)
            continue
        if isinstance(record.get("world_size"), int):
            run.world_size = record["world_size"]
        step, epoch = record.get("step"), _number(record.get("epoch"))
        if not isinstance(step, int) or epoch is None:
            continue
        for key, value in record.items():
            number = _number(value)
            if key not in _NOT_SERIES and number is not None:
                run.series.setdefault(key, {})[step] = (epoch, number)
    return run


# ------------------------------------------------------------------------------------------------------ sections
@dataclass(frozen=True)
class Section:
    name: str
    title: str
    about: str
    wants: Callable[[str], bool]


def _is_loss(key: str) -> bool:
    return key.startswith("loss") or key in ("ntxent", "qscore/term")


SECTIONS = (
    Section("losses", "Losses", "The total loss and every term the recipe logs, mean over each logging window.",
            _is_loss),
    Section("schedules", "Schedules", "Per-iteration learning rate and weight decay, and for methods with an EMA "
            "teacher its momentum and temperature.", lambda k: k in ("lr", "weight_decay", *_TEACHER_SCHEDULES)),
    Section("knn", "kNN probe", "Weighted kNN top-1 / top-5 on the val split (eval.every_epochs).",
            lambda k: k.startswith("knn/")),
    Section("health", "Health", "Every train.health_every steps, on one process's batch. Teacher entropy near "
            "log K = uniform collapse, batch entropy near 0 = one-prototype collapse; rankme/* is the effective rank "
            "of the CLS features (Garrido et al. 2023; at most min(batch, dim), higher is healthier), embed_std/* "
            "the per-dimension std of the L2-normalised CLS features (about 1/sqrt(dim) when healthy, 0 when "
            "collapsed); dense/* the mean cosine of patch tokens to their [CLS] and to each other (DINOv3's dense "
            "health: both rise towards 1 as the dense features degrade).",
            lambda k: k in HEALTH_KEYS or k.startswith(EMBEDDING_PREFIXES)),
    Section("throughput", "Throughput", "Images per second over all processes, per logging window (evaluations "
            "and checkpoints fall between windows).", lambda k: k == "images_per_s"),
    Section("evaluation", "Evaluation", "Fine-tuning and segmentation metrics on the val split at each evaluation "
            "(COCO AP of -1: no objects of that size; not drawn). Per-class IoU is in the table of last values.",
            lambda k: k in ("mIoU", "pixel_acc") or k.startswith(("bbox/", "segm/"))),
)
OTHER = Section("other", "Other metrics", "Everything else the run logged.", lambda k: not k.startswith("iou/"))


def _eval_every(config: dict[str, Any]) -> int:
    """eval.every_epochs of a run's config (eval.knn_every_epochs in a run of sslpipe 0.1)."""
    ev = config.get("eval") or {}
    return ev.get("every_epochs", ev.get("knn_every_epochs", 0))


def _shown(run: RunLog, key: str) -> bool:
    """Whether a run's metric is drawn: the teacher schedules only for methods with a teacher, COCO's -1 never."""
    if key in _TEACHER_SCHEDULES and (run.method.startswith("finetune_") or run.method in _TEACHERLESS):
        return False
    return any(not (v == -1.0 and key.startswith(("bbox/", "segm/"))) for v in run.points(key)[1])


def section_keys(runs: Sequence[RunLog]) -> dict[Section, list[str]]:
    """The metrics each section draws (in first-seen order), every drawable metric in exactly one section."""
    keys = list(dict.fromkeys(k for run in runs for k in run.series if any(_shown(r, k) for r in runs)))
    out: dict[Section, list[str]] = {}
    for key in keys:
        section = next((s for s in SECTIONS if s.wants(key)), OTHER if OTHER.wants(key) else None)
        if section is not None:
            out.setdefault(section, []).append(key)
    return {s: out[s] for s in (*SECTIONS, OTHER) if s in out}


def plot_section(runs: Sequence[RunLog], keys: Sequence[str], path: Path) -> Path:
    """One panel per metric, every run on the same axes (one colour per run), against epochs."""
    plt = pyplot()
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.0 * nrows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            if not _shown(run, key):
                continue
            x, y = run.points(key)
            ax.plot(x, y, color=colours(i % 10), label=run.label, marker="o" if len(x) <= 30 else None,
                    markersize=3, linewidth=1.3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    legend = 0.3 if len(runs) > 1 else 0.0  # inches over the panels for the runs' legend
    if legend:
        entries = {name: handle for ax in axes.flat for handle, name in zip(*ax.get_legend_handles_labels())}
        fig.legend(list(entries.values()), list(entries), loc="upper center", ncol=min(len(runs), 5), fontsize=9,
                   frameon=False)
    height = 3.0 * nrows  # fixed margins in inches (tight_layout costs a third of the drawing time)
    fig.subplots_adjust(left=0.75 / fig.get_figwidth(), right=0.98, bottom=0.45 / height,
                        top=1 - (0.3 + legend) / height, wspace=0.3, hspace=0.5)
    return save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------------------------------------------------- html
_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1400px;
padding:0 16px;color:#222}h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:32px}p.about{color:#555;font-size:14px;max-width:1100px}img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:480px}code{background:#f3f3f3;
padding:1px 3px}figure{margin:8px 0 16px}figcaption{font-size:13px;color:#555}nav a{margin-right:12px}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if i >= numeric_from else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(run: RunLog) -> list[tuple[str, str]]:
    c = run.config
    data, train = c.get("data", {}) or {}, c.get("train", {}) or {}
    world = run.world_size or 1
    batch = data.get("batch_size")
    steps = max((s for series in run.series.values() for s in series), default=0)
    epochs = max((e for series in run.series.values() for e, _ in series.values()), default=0.0)
    wall = run.times[-1] - run.times[0] if len(run.times) > 1 else None
    speed = run.points("images_per_s")[1]
    knn = sorted(k for k in run.series if k.startswith("knn/top1"))
    rows = [("method", run.method),
            ("backbone", (c.get("model") or {}).get("init_from") or (c.get("finetune") or {}).get("backbone")
             or (c.get("model") or {}).get("arch", "?")),  # finetune.backbone: a run of sslpipe 0.1
            ("processes x batch x accumulation", f"{world} x {batch} x {train.get('grad_accum_steps', 1)}"),
            ("steps / epochs logged", f"{steps} / {epochs:g}"),
            *([("lines of trajectories a resume replaced (not shown)", str(run.replaced))]
              if run.replaced else []),
            ("wall time (first to last log line)", f"{wall / 60:.1f} min" if wall is not None else "?"),
            ("mean images/s", _fmt(sum(speed) / len(speed)) if speed else "not logged")]
    rows += [(f"last {key}", _fmt(run.last(key))) for key in ["loss", *knn, "mIoU", "bbox/AP", "segm/AP"]
             if run.last(key) is not None]
    return rows


def _command(run: RunLog) -> str:
    verb = "finetune" if run.method.startswith("finetune_") else "train"
    given = run.overrides or "(none recorded)"
    return (f"<p>Overrides given on the command line: <code>{_e(given)}</code>. The recipe file itself is not "
            f"recorded; the resolved config below replays the run: <code>sslpipe {verb} {_e(run.path / 'config.yaml')}"
            f" run_name=NEW_NAME</code>.</p>")


def _copy_pictures(run: RunLog, out: Path, index: int) -> list[tuple[str, str]]:
    """Copy RUN/predictions/*.png and RUN/*.png beside the page; (relative src, caption) of each."""
    found = [(p, f"predictions {p.stem}") for p in sorted((run.path / "predictions").glob("*.png"))]
    found += [(p, p.name) for p in sorted(run.path.glob("*.png"))]
    copied = []
    for src, caption in found:
        rel = Path(f"run{index}") / src.relative_to(run.path)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
        copied.append((rel.as_posix(), caption))
    return copied


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def default_out(runs: Sequence[str | Path]) -> Path:
    """RUN/report for one run, RUN_A/report-compare for several."""
    return Path(runs[0]) / ("report" if len(runs) == 1 else "report-compare")


def _curves_html(logs: Sequence[RunLog], out: Path) -> list[tuple[str, str, str]]:
    """(anchor, title, html) of every section with curves, drawn into `out`; a note where kNN was not logged."""
    sections = section_keys(logs)
    pretraining = [run for run in logs if not (run.method.startswith("finetune_") or run.method in _SUPERVISED)]
    blocks = []
    for section in (*SECTIONS, OTHER):
        if section in sections:
            keys = sections[section]
            png = plot_section(logs, keys, out / f"{section.name}.png")
            alt = f"{section.title}: {', '.join(keys)}"
            content = f"<p class='about'>{_e(section.about)}</p><img src='{png.name}' alt='{_e(alt)}'>"
            blocks.append((section.name, section.title, content))
        elif section.name == "knn" and pretraining:
            notes = "".join(f"<li>{_e(_no_knn(run))}</li>" for run in pretraining)
            note = (f"<p class='about'>No kNN probe logged:</p><ul>{notes}</ul><p class='about'>Any export can be "
                    "probed: <code>sslpipe knn RUN/export/teacher --data SHARDS</code>.</p>")
            blocks.append(("knn", section.title, note))
    return blocks


def _no_knn(run: RunLog) -> str:
    """Why a pretraining run has no kNN line: probing is off, or the run has not reached its first probe."""
    every = _eval_every(run.config)
    if not every:
        return f"{run.label}: eval.every_epochs is 0 (off); set it to N to probe every N epochs during training."
    epochs = max((e for series in run.series.values() for e, _ in series.values()), default=None)
    first = f"the first probe runs at the end of epoch {every} (eval.every_epochs={every})"
    if epochs is None:
        return f"{run.label}: no evaluation logged yet: the run logged no training line; {first}."
    if epochs < every:
        return f"{run.label}: no evaluation logged yet: the run's lines end at epoch {epochs:g}; {first}."
    return (f"{run.label}: no probe result logged although the run's lines reach epoch {epochs:g}; {first}, and a "
            "run stopped during it logs none.")


def _pictures_html(logs: Sequence[RunLog], out: Path) -> str:
    figures = [f"<figure><img src='{_e(src)}' alt='{_e(caption)}' loading='lazy'><figcaption>{_e(run.label)}: "
               f"{_e(caption)}</figcaption></figure>"
               for i, run in enumerate(logs) for src, caption in _copy_pictures(run, out, i)]
    return "".join(figures) or ("<p class='about'>No pictures in the run directories (fine-tuning runs write "
                                "predictions/epoch_N.png at each evaluation).</p>")


def write_report(runs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write `index.html` and its PNGs into `out` (default: `default_out`); return the path of index.html."""
    if not runs:
        raise ValueError("sslpipe report needs at least one run directory")
    paths = [Path(r) for r in runs]
    logs = [read_run(p, label) for p, label in zip(paths, _unique_labels(paths))]
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    labels = [run.label for run in logs]

    summaries = [dict(_summary(run)) for run in logs]
    fields = list(dict.fromkeys(k for summary in summaries for k in summary))
    blocks = [("summary", "Summary", _table(["", *labels], [[f, *(s.get(f, "") for s in summaries)] for f in fields],
                                            numeric_from=99))]
    blocks += _curves_html(logs, out)
    all_keys = list(dict.fromkeys(k for run in logs for k in run.series))
    blocks.append(("last", "Last values", "<p class='about'>The last logged value of every metric.</p>"
                   + _table(["metric", *labels], [[k, *(_fmt(r.last(k)) for r in logs)] for k in all_keys])))
    events = [(run.label, e.get("step", ""), e["event"],
               json.dumps({k: v for k, v in e.items() if k not in ("step", "event", "time")}))
              for run in logs for e in run.events]
    if events:
        blocks.append(("events", "Events", _table(["run", "step", "event", "details"], events, numeric_from=99)))
    blocks.append(("pictures", "Pictures", _pictures_html(logs, out)))
    blocks.append(("config", "Config and command", "".join(
        f"<h3>{_e(run.label)}</h3>{_command(run)}<details><summary>config.yaml (resolved)</summary>"
        f"<pre>{_e(run.config_text or '(no config.yaml)')}</pre></details>" for run in logs)))

    title = "sslpipe report: " + ", ".join(labels)
    sources = ", ".join(f"<code>{_e(run.path.resolve())}</code>" for run in logs)
    nav = "".join(f"<a href='#{anchor}'>{_e(name)}</a>" for anchor, name, _ in blocks)
    body = "".join(f"<h2 id='{anchor}'>{_e(name)}</h2>{content}" for anchor, name, content in blocks)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><p class='about'>Written "
            f"{datetime.now():%Y-%m-%d %H:%M} from {sources}</p><nav>{nav}</nav>{body}</body></html>\n")
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, index)
    return index
