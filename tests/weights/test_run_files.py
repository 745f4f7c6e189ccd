"""The small files a run writes when it starts or resumes: config.yaml written whole or not at all, and the training
data's manifest sha256 recorded for the model card."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from sslpipe.engine.run_config import write_config
from sslpipe.recipes import load_config

_CHILD = """
import resource, signal, sys
from pathlib import Path
from sslpipe.engine.run_config import config_changes, record_resumed_config
from sslpipe.errors import WriteFailed
from sslpipe.recipes import load_config
cfg = load_config(sys.argv[1], [f"data.train={sys.argv[3]}", *sys.argv[4:]])
changes = config_changes(cfg, Path(sys.argv[2]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk would
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    record_resumed_config(cfg, Path(sys.argv[2]), changes, " ".join(sys.argv[4:]))
except WriteFailed as err:
    print(err)
    sys.exit(3)
"""


def _shards(tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": "sslpipe-shards/1", "splits": {"train": 1}}')
    return shards


@pytest.mark.parametrize("overrides", [[], ["optim.lr=0.5"]])
def test_a_config_write_failing_part_way_leaves_config_yaml_whole(tmp_path, overrides):
    """A resume rewrites RUN/config.yaml (keeping the previous one as config-<time>.yaml when it changes keys); a
    write that fails after 1000 bytes (a file-size limit standing in for a full disk) is one WriteFailed line, and
    config.yaml is byte for byte what it was."""
    recipe, run = REPO / "recipes" / "demo_dino.yaml", tmp_path / "run"
    run.mkdir()
    shards = _shards(tmp_path)
    write_config(load_config(recipe, [f"data.train={shards}"]), run, None)
    before = (run / "config.yaml").read_bytes()
    assert len(before) > 1000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-B", "-c", _CHILD, str(recipe), str(run), str(shards), *overrides],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stderr[-2000:]
    assert f"could not write {run / 'config.yaml'}: File too large" in child.stdout
    assert (run / "config.yaml").read_bytes() == before
    kept = sorted(run.glob("config-*.yaml"))
    assert [p.read_bytes() for p in kept] == ([before] if overrides else [])
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.yaml", "data_manifest.json",
                                                            *(p.name for p in kept)])


def test_the_training_data_manifest_is_recorded_when_the_run_starts(tmp_path):
    recipe, run = REPO / "recipes" / "demo_dino.yaml", tmp_path / "run"
    run.mkdir()
    shards = _shards(tmp_path)
    cfg = load_config(recipe, [f"data.train={shards}"])
    first = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    write_config(cfg, run, None)
    entry = {"data.train": str(shards), "manifest": str((shards / "manifest.json").resolve()), "sha256": first}
    assert json.loads((run / "data_manifest.json").read_text()) == {"train": [entry]}
    write_config(cfg, run, None)  # a resume on the same shards adds nothing
    assert json.loads((run / "data_manifest.json").read_text()) == {"train": [entry]}
    (shards / "manifest.json").write_text('{"format": "sslpipe-shards/1", "splits": {"train": 2}}')
    write_config(cfg, run, None)  # a resume on rewritten shards: a second entry
    second = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert json.loads((run / "data_manifest.json").read_text()) == {"train": [entry, {**entry, "sha256": second}]}
