"""Two "nodes" x 2 processes on localhost (two `accelerate launch --num_machines 2` over gloo) train iBOT: every
sample once per epoch over the 4 ranks, identical centres after every step, one checkpoint with 4 RNG states, a
sharded periodic kNN; then the run resumes on 1 process (elastic) and finishes."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, child_env

from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards

TINY = ["model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "ibot.head.out_dim=64",
        "ibot.head.patch_out_dim=64", "ibot.head.hidden_dim=32", "ibot.head.bottleneck_dim=16", "crops.n_local=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_two_processes_then_elastic_resume_on_one(tmp_path: Path) -> None:
    shards = tmp_path / "shards"  # 16 shards x 8 samples: 4 shards per rank, 4 batches of 8 per rank and epoch
    write_shards(shards, source="digits", options=ShardOptions(samples_per_shard=8, limit=128), progress=False)
    common = [str(REPO / "recipes/demo_ibot.yaml"), "method=tests.workers.ddp_ibot:CheckedIBOT", f"data.train={shards}",
              f"data.val={shards}", "data.batch_size=8", "data.num_workers=0", "data.steps_per_epoch=null",
              "train.epochs=2", "train.log_every=2", "eval.every_epochs=1", "eval.knn_k=[5]",
              f"output_dir={tmp_path}", "run_name=nodes", *TINY]
    port = _port()
    env = child_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--num_processes", "4", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "sslpipe", "train", *common],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert "4 process(es) x batch 8 x 1 accumulation = global batch 32" in outputs[0]

    run = tmp_path / "nodes"
    records = {r: [json.loads(line) for line in (run / f"steps_rank{r}.jsonl").read_text().splitlines()]
               for r in range(4)}
    train_keys = {f"train_{i:08d}" for i in range(128)}
    for epoch in (0, 1):
        seen = Counter(k for r in range(4) for rec in records[r] if rec["epoch"] == epoch for k in rec["keys"])
        assert set(seen) == train_keys and set(seen.values()) == {1}, f"epoch {epoch}: each sample exactly once"
    assert [len(records[r]) for r in range(4)] == [8] * 4
    for i in range(8):  # the centres are all-reduced: the same bits on every rank after every step
        assert len({records[r][i]["centres"] for r in range(4)}) == 1

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008"], ckpts  # written once each, no leftover .tmp
    last = run / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in last.glob("rng_state_*")) == [f"rng_state_{r}.safetensors" for r in range(4)]
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 4
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [m["knn/top1_k5"] for m in metrics if "knn/top1_k5" in m]
    assert len(knn) == 2 and all(0.0 < v <= 1.0 for v in knn), "the sharded periodic kNN ran each epoch"
    from sslpipe.eval.knn import run_knn
    from sslpipe.eval.spec import FeatureSpec, ProbeData
    from sslpipe.weights.run_export import export_run

    exported = export_run(run, checkpoint=8)
    single = run_knn(exported, FeatureSpec.from_export(exported, resize=32, crop=32), ProbeData(shards, shards),
                     k_list=[5], progress=False)
    assert single["k"][5]["top1"] == knn[1], "4 shares of the extraction, gathered == one process reading it all"

    # elastic: the 4-process run continues on 1 process (16 steps per epoch): epoch 2 begins at step 32
    resume = subprocess.run([sys.executable, "-m", "sslpipe", "train", *(o for o in common if o != "train.epochs=2"),
                             "train.epochs=3",
                             "train.max_steps=34", "--resume", str(run)],
                            env=child_env(OMP_NUM_THREADS="1"), cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "elastic resume" in resume.stdout and "continues as step 32" in resume.stdout
    state = json.loads((run / "checkpoints" / "step_00000034" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["global_step"] == 34 and state["global_batch"] == 8
