#!/usr/bin/env bash
# Distillation evidence (issue 32, docs/distill.md): the SimCLR ResNet-18 teacher (recipes/moonshot_simclr.yaml,
# its 2400 steps, trained into $E/teacher: sslpipe train recipes/moonshot_simclr.yaml data.train=$E/fmnist
# data.val=$E/fmnist output_dir=$E/teacher) distilled into the demo ViT (recipes/demo_distill.yaml, 500 steps) vs the demo ViT's
# own recipe from scratch at the same 500 steps (the adapt runs' Fashion-MNIST pretrains) vs the teacher vs random
# init; seeds 0, 1, 2; kNN on Fashion-MNIST (first 10,000 train / 2,000 val, as the demo) and on digits.
set -u
E=${E:-/work/evidence}; S=${S:-sslpipe}; PY=${PY:-python}; D=$E/distill
mkdir -p $D
T=$E/teacher/simclr_resnet18/export/student
[ -f $T/model.safetensors ] || {
  $S train recipes/moonshot_simclr.yaml data.train=$E/fmnist data.val=$E/fmnist output_dir=$E/teacher --resume auto \
    > $D/teacher_train.log 2>&1
  $S export $E/teacher/simclr_resnet18 > $D/teacher_export.log 2>&1; }
[ -f $E/random_vit/model.safetensors ] || $PY - $E/random_vit <<'PY'  # the demo recipe's network at its seed's init
import sys
from pathlib import Path
from sslpipe.demo import _random_init_export
from sslpipe.recipes import load_config
_random_init_export(load_config("recipes/demo_dinov2.yaml", ["data.train=unused"]), Path(sys.argv[1]))
PY
for s in 0 1 2; do  # the from-scratch arm: docs/adapt.md's Fashion-MNIST pretrains (adapt.sh makes the same)
  run=$E/fmnist_pretrain/seed$s
  [ -f $run/export/teacher/model.safetensors ] || {
    $S train recipes/demo_dinov2.yaml data.train=$E/fmnist data.val=$E/fmnist seed=$s output_dir=$E/fmnist_pretrain \
      run_name=seed$s --resume auto > $D/pretrain_s$s.log 2>&1 && $S export $run > /dev/null 2>&1; }
done
probe() {  # export, name
  [ -f $D/knn_fm_$2.json ] || $S knn $1 --data $E/fmnist --k 10 20 --max-train 10000 --max-val 2000 --out $D/knn_fm_$2.json > $D/knn_fm_$2.log 2>&1
  [ -f $D/knn_digits_$2.json ] || $S knn $1 --data $E/digits --k 10 20 --out $D/knn_digits_$2.json > $D/knn_digits_$2.log 2>&1
}
probe $T teacher
probe $E/random_vit random_vit
for s in 0 1 2; do
  run=$D/runs/vit_s$s
  [ -f $run/export/student/model.safetensors ] || {
    /usr/bin/time -f "%e s" -o $D/time_vit_s$s.txt $S train recipes/demo_distill.yaml data.train=$E/fmnist \
      data.val=$E/fmnist distill.teacher=$T seed=$s output_dir=$D/runs run_name=vit_s$s --resume auto > $D/vit_s$s.log 2>&1
    $S export $run > /dev/null 2>&1; }
  probe $run/export/student vit_distilled_s$s
  probe $E/fmnist_pretrain/seed$s/export/teacher vit_scratch_s$s
done
echo done > $D/DONE
