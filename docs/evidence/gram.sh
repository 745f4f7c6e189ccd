#!/usr/bin/env bash
# Gram anchoring evidence (issue 34, docs/methods.md §11): recipes/demo_dinov3.yaml run for 1000 steps (10 epochs,
# every epoch's checkpoint kept) on Fashion-MNIST with Gram anchoring (weight 2, the Gram teacher from step 200,
# refreshed every 100) and without ('dinov3.gram={weight: 0}'), seeds 0, 1, 2. Probes: linear-seg on the generated
# scenes (docs/finetune.md's protocol: 64 px, last 4 blocks, 1000 steps, lr 0.01, 200 val scenes) of the teacher at steps 500,
# 700 and 1000; kNN on Fashion-MNIST (first 10,000 train / 2,000 val) at step 1000; random-init baselines. The dense
# health (dense/patch_cls_cos, dense/patch_patch_cos of the teacher) is in each run's metrics.jsonl every 50 steps.
# Then: python docs/evidence/gram_report.py $E/gram docs/img/gram_dense_health.png
set -u
E=${E:-/work/evidence}; S=${S:-sslpipe}; G=$E/gram
mkdir -p $G/curve
[ -f $E/scenes/manifest.json ] || $S shards --dataset scenes $E/scenes > $G/scenes.log 2>&1
seg() {  # export folder, result name
  [ -f $G/curve/seg_$2.json ] || $S linear-seg $1 --data $E/scenes --size 64 --layers 4 --steps 1000 --lr 0.01 \
    --max-val 200 --out $G/curve/seg_$2.json > $G/curve/seg_$2.log 2>&1
}
knn() {
  [ -f $G/knn_$2.json ] || $S knn $1 --data $E/fmnist --k 10 20 --max-train 10000 --max-val 2000 \
    --out $G/knn_$2.json > $G/knn_$2.log 2>&1
}
for s in 0 1 2; do
  for arm in gram nogram; do
    run=$G/runs/${arm}_s$s
    if [ $arm = gram ]; then extra=(); else extra=("dinov3.gram={weight: 0}"); fi  # the runs had gram.weight=0
    [ -f $run/export/teacher/model.safetensors ] || {
      /usr/bin/time -f "%e s" -o $G/time_${arm}_s$s.txt $S train recipes/demo_dinov3.yaml data.train=$E/fmnist \
        data.val=$E/fmnist seed=$s train.epochs=10 train.keep_last=20 "${extra[@]}" output_dir=$G/runs \
        run_name=${arm}_s$s \
        --resume auto > $G/${arm}_s$s.log 2>&1
      $S export $run > /dev/null 2>&1; }
  done
done
for step in 1000 700 500; do
  for s in 0 1 2; do
    for arm in gram nogram; do
      ex=$G/curve/${arm}_s${s}_$step
      [ -f $ex/model.safetensors ] || $S export $G/runs/${arm}_s$s --out $ex \
        --checkpoint $G/runs/${arm}_s$s/checkpoints/$(printf 'step_%08d' $step) > /dev/null 2>&1
      seg $ex ${arm}_s${s}_$step
      [ $step = 1000 ] && knn $ex ${arm}_s$s
    done
  done
done
for s in 0 1 2; do  # the demo's random-init baseline, as `sslpipe demo` builds it
  [ -f $G/curve/random_s$s/model.safetensors ] || python -c "import sys; from pathlib import Path; \
from sslpipe.demo import _random_init_export; from sslpipe.recipes import load_config; \
_random_init_export(load_config('recipes/demo_dinov3.yaml', [f'seed={sys.argv[1]}']), Path(sys.argv[2]))" \
    $s $G/curve/random_s$s
  knn $G/curve/random_s$s random_s$s
done
seg $G/curve/random_s0 random_s0
echo done > $G/DONE
