#!/usr/bin/env bash
# Crop packing and regional compile on the CPU (issue 36; README reference rows `bench step --packing` and
# `train.compile=true`). Run from the repository root with its .venv; results in $E/packing.
# 1. `sslpipe bench step --packing`, packed / per size, with the dense block-diagonal bias it replaced (commit f148055,
#    checked out beside this one) and with attention per crop (this checkout), one after the other, 3 times:
#    the demo's multi-crop (2x32 + 4x16, batch 16, fp32) and the published ViT-S/14 (2x224 + 8x98, batch 2, its fp16).
# 2. recipes/demo_dinov2.yaml trained 90 steps on Fashion-MNIST with and without train.compile (kNN every 30 steps),
#    with TORCH_LOGS=recompiles: img/s per 10 steps and the recompiles in the logs.
set -u
E=${E:-/work/evidence}; P=$E/packing; PY=${PY:-$PWD/.venv/bin/python}
mkdir -p $P
[ -d $P/old ] || git worktree add -f $P/old f148055 > /dev/null
for r in 1 2 3; do
  for code in old new; do
    src=$PWD; [ $code = old ] && src=$P/old
    (cd $src && PYTHONPATH=$src $PY -m sslpipe bench step --recipe recipes/demo_dinov2.yaml --packing --batch-size 16 \
      --steps 10 --warmup 3 crops.n_local=4 crops.global_size=32 crops.local_size=16 --out $P/demo_${code}_$r.json \
      > $P/demo_${code}_$r.log 2>&1)
    (cd $src && PYTHONPATH=$src $PY -m sslpipe bench step --recipe recipes/dinov2_vit_small.yaml --packing \
      --batch-size 2 --steps 5 --warmup 2 --out $P/vits_${code}_$r.json > $P/vits_${code}_$r.log 2>&1)
  done
done
$PY - $P <<'PY'
import json, statistics as st, sys
for cfg in ("demo", "vits"):
    for code in ("old", "new"):
        r = [json.load(open(f"{sys.argv[1]}/{cfg}_{code}_{i}.json")) for i in (1, 2, 3)]
        ratio = [x["packed_over_per_size"] for x in r]
        packed = [x["packed"]["ours_ms"] for x in r]
        print(f"{cfg} {code}: packed / per size {st.mean(ratio):.3f} +- {st.stdev(ratio):.3f}; "
              f"packed {st.mean(packed):.0f} +- {st.stdev(packed):.0f} ms")
PY
[ -f $E/fmnist/manifest.json ] || $PY -m sslpipe shards --dataset fashion-mnist $E/fmnist > /dev/null 2>&1
for arm in eager compile; do
  extra=""; [ $arm = compile ] && extra="train.compile=true"
  rm -rf $P/runs/$arm
  TORCH_LOGS=recompiles $PY -m sslpipe train recipes/demo_dinov2.yaml data.train=$E/fmnist data.val=$E/fmnist \
    data.steps_per_epoch=30 train.epochs=3 eval.every_epochs=1 eval.max_train=1000 eval.max_val=500 \
    data.num_workers=0 output_dir=$P/runs run_name=$arm $extra > $P/train_$arm.log 2>&1
  echo "$arm: $(grep -o 'img_s=[0-9.]*' $P/train_$arm.log | uniq | tr '\n' ' ')"
  echo "$arm: $(grep -c 'Recompiling function' $P/train_$arm.log) recompile(s); last loss $(grep -o 'loss=[0-9.]*' \
    $P/train_$arm.log | tail -1)"
done
