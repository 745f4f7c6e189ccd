#!/usr/bin/env bash
# Continued-pretraining evidence (issue 32, docs/adapt.md): the demo's Fashion-MNIST export (seeds 0, 1, 2) continued
# on digits (recipes/demo_adapt.yaml) vs not adapted vs the demo recipe from scratch on digits, 500 steps each;
# kNN on digits val. E = an evidence folder holding shards fmnist/ and digits/ (`sslpipe shards --dataset ...`).
set -u
E=${E:-/work/evidence}; S=${S:-sslpipe}; A=$E/adapt
mkdir -p $A
for s in 0 1 2; do
  run=$E/fmnist_pretrain/seed$s
  [ -f $run/export/teacher/model.safetensors ] || {
    $S train recipes/demo_dinov2.yaml data.train=$E/fmnist data.val=$E/fmnist seed=$s output_dir=$E/fmnist_pretrain \
      run_name=seed$s --resume auto > $A/pretrain_s$s.log 2>&1 && $S export $run >> $A/export.log 2>&1; }
  [ -f $A/export_s$s/model.safetensors ] || $S export $run --with-heads --out $A/export_s$s >> $A/export.log 2>&1
done
knn() { [ -f $2 ] || $S knn $1 --data $E/digits --k 10 20 --out $2 > $2.log 2>&1; }
for s in 0 1 2; do knn $A/export_s$s $A/knn_notadapted_s$s.json; done
for s in 0 1 2; do
  for arm in adapted scratch; do
    run=$A/runs/${arm}_s$s
    if [ $arm = adapted ]; then args="recipes/demo_adapt.yaml model.init_from=$A/export_s$s"; else args=recipes/demo_dinov2.yaml; fi
    [ -f $run/export/teacher/model.safetensors ] || {
      /usr/bin/time -f "%e s" -o $A/time_${arm}_s$s.txt $S train $args data.train=$E/digits data.val=$E/digits \
        seed=$s output_dir=$A/runs run_name=${arm}_s$s --resume auto > $A/${arm}_s$s.log 2>&1
      $S export $run >> $A/export.log 2>&1; }
    knn $run/export/teacher $A/knn_${arm}_s$s.json
  done
done
echo done > $A/DONE
