#!/usr/bin/env bash
# Gram anchoring evidence (issue 34, docs/methods.md §11): recipes/demo_dinov3.yaml (500 steps on Fashion-MNIST) with
# Gram anchoring (weight 2, the Gram teacher from step 200, refreshed every 100) and without (dinov3.gram.weight=0),
# seeds 0, 1, 2; linear-seg on the generated scenes, kNN on Fashion-MNIST (first 10,000 train / 2,000 val), and the
# dense health (dense/patch_cls_cos, dense/patch_patch_cos) the run logs every 50 steps.
set -u
E=${E:-/work/evidence}; S=${S:-sslpipe}; G=$E/gram
mkdir -p $G
[ -f $E/scenes/manifest.json ] || $S shards --dataset scenes $E/scenes > $G/scenes.log 2>&1
for s in 0 1 2; do
  for arm in gram nogram; do
    run=$G/runs/${arm}_s$s
    if [ $arm = gram ]; then extra=""; else extra="dinov3.gram.weight=0"; fi
    [ -f $run/export/teacher/model.safetensors ] || {
      /usr/bin/time -f "%e s" -o $G/time_${arm}_s$s.txt $S train recipes/demo_dinov3.yaml data.train=$E/fmnist \
        data.val=$E/fmnist seed=$s $extra output_dir=$G/runs run_name=${arm}_s$s --resume auto > $G/${arm}_s$s.log 2>&1
      $S export $run > /dev/null 2>&1; }
    [ -f $G/seg_${arm}_s$s.json ] || $S linear-seg $run/export/teacher --data $E/scenes --steps 300 --max-val 200 \
      --out $G/seg_${arm}_s$s.json > $G/seg_${arm}_s$s.log 2>&1
    [ -f $G/knn_${arm}_s$s.json ] || $S knn $run/export/teacher --data $E/fmnist --k 10 20 --max-train 10000 \
      --max-val 2000 --out $G/knn_${arm}_s$s.json > $G/knn_${arm}_s$s.log 2>&1
  done
done
echo done > $G/DONE
