"""sslpipe.metrics_log: the records of a metrics.jsonl (a line cut by a crash skipped) and the run's current
trajectory (a resume at step S drops the records before it with a step after S), on hand-made records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sslpipe.metrics_log import RESUMED, current_trajectory, read_records, step_of


def loss(step: int, value: float) -> dict:
    return {"step": step, "epoch": step / 4, "loss": value}


def knn(step: int, value: float) -> dict:
    return {"step": step, "epoch": step // 4, "knn/top1_k20": value}


def resumed(step: int) -> dict:
    return {"step": step, "event": RESUMED, "checkpoint": f"runs/r/checkpoints/step_{step:08d}"}


def write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


# trajectory A: 8 steps, kNN at 4 and 8, an event at 8; rolled back to step 4, stopped at step 5
TRAJECTORY_A = [loss(2, 9.5), loss(4, 9.2), knn(4, 0.31), loss(6, 8.9), loss(8, 8.8), knn(8, 0.30),
                {"step": 8, "event": "loader skipped", "corrupt_samples": 0}]


def test_a_roll_back_drops_the_abandoned_trajectory() -> None:
    records = [*TRAJECTORY_A, resumed(4), loss(5, 9.0)]
    assert current_trajectory(records) == [loss(2, 9.5), loss(4, 9.2), knn(4, 0.31), resumed(4), loss(5, 9.0)]
    assert records[3] == loss(6, 8.9)  # the input is left as it was


def test_a_resume_at_the_last_step_keeps_everything() -> None:
    """A run stopped at its step-8 checkpoint and resumed there: nothing was logged after step 8, nothing goes."""
    records = [*TRAJECTORY_A, resumed(8), loss(10, 8.7)]
    assert current_trajectory(records) == records


def test_successive_resumes_apply_in_turn() -> None:
    """Killed at step 7 after the step-6 checkpoint (step 7 is logged again), then rolled back to step 2: only steps
    up to 2 of the earlier trajectories stay (the step-6 `resumed` record belongs to the abandoned one)."""
    records = [loss(2, 9.5), loss(4, 9.2), loss(6, 8.9), loss(7, 8.85), resumed(6), loss(7, 8.86), loss(8, 8.8),
               resumed(2), loss(3, 9.4)]
    assert current_trajectory(records) == [loss(2, 9.5), resumed(2), loss(3, 9.4)]
    killed = records[:6]  # the first resume alone: the killed run's step 7 goes, the new step 7 stays
    assert current_trajectory(killed) == [loss(2, 9.5), loss(4, 9.2), loss(6, 8.9), resumed(6), loss(7, 8.86)]


def test_other_events_and_records_without_a_step_drop_nothing() -> None:
    records = [loss(4, 9.2), {"event": "note"}, {"step": 2, "event": "stopped on request"}, loss(6, 8.9),
               {"step": "3", "event": RESUMED}, {"step": True, "event": RESUMED}, resumed(3), {"loss": 1.0}]
    # only the last `resumed` has a usable step: loss(4) and loss(6) go, the step-less records stay
    assert current_trajectory(iter(records)) == [{"event": "note"}, {"step": 2, "event": "stopped on request"},
                                                 {"step": "3", "event": RESUMED}, {"step": True, "event": RESUMED},
                                                 resumed(3), {"loss": 1.0}]
    assert [step_of(r) for r in records] == [4, None, 2, 6, None, None, 3, None]


def test_read_records_skips_a_cut_line_and_keeps_what_follows(tmp_path: Path) -> None:
    path = write(tmp_path / "metrics.jsonl", TRAJECTORY_A[:3], tail='\n[1, 2]\n{"step": 6, "epo')
    assert read_records(path) == TRAJECTORY_A[:3]  # the blank line, a non-object and the cut last line skipped
    # a later start appends its first record to the cut line (which has no newline): that record is kept
    with path.open("a") as f:
        f.write(json.dumps(resumed(4)) + "\n" + json.dumps(loss(5, 9.0)) + "\n")
    records = read_records(path)
    assert records == [*TRAJECTORY_A[:3], resumed(4), loss(5, 9.0)]
    assert current_trajectory(records) == records


def test_read_records_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing/metrics.jsonl not found"):
        read_records(tmp_path / "nothing" / "metrics.jsonl")


def test_an_elastic_resume_compares_the_checkpoints_own_step() -> None:
    """A resume to another batch logs its rescaled step (checkpoint step 8 of 8 per epoch continues as step 16 of
    16): the earlier lines are compared with `from_step`, so epoch 1's lines up to step 8 stay and step 10 goes."""
    records = [{"step": 4, "loss": 1.0}, {"step": 8, "loss": 0.9}, {"step": 8, "knn/top1": 0.3},
               {"step": 10, "loss": 0.8}, {"step": 16, "event": "resumed", "from_step": 8}, {"step": 18, "loss": 0.7}]
    assert [r.get("loss", r.get("knn/top1", r.get("event"))) for r in current_trajectory(records)] == [
        1.0, 0.9, 0.3, "resumed", 0.7]
