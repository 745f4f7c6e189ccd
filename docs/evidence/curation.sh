#!/usr/bin/env bash
# Curation evidence (issue 33, docs/curate.md): a skewed pool built from Fashion-MNIST train (skewed_pool.py), embedded
# by the demo's export (seed 0); curated to N vs a random N vs the whole pool, the demo recipe (500 steps) on each,
# seeds 0, 1, 2; kNN on the balanced Fashion-MNIST val split (first 10,000 train / 2,000 val, as the demo).
set -u
E=${E:-/work/evidence}; S=${S:-sslpipe}; PY=${PY:-python}; P=$E/curate; N=${N:-6000}
HERE=$(dirname $0)
mkdir -p $P
[ -f $P/pool_images/truth.json ] || $PY $HERE/skewed_pool.py $P/pool_images
[ -f $P/pool/manifest.json ] || $S shards --folder $P/pool_images $P/pool > $P/pool.log 2>&1
B=$E/fmnist_pretrain/seed0/export/teacher
/usr/bin/time -f "%e s %M KB" -o $P/time_embed.txt $S embed $B --data $P/pool --out $P/emb > $P/embed.log 2>&1
knn() { [ -f $2 ] || $S knn $1 --data $E/fmnist --k 10 20 --max-train 10000 --max-val 2000 --out $2 > $2.log 2>&1; }
for s in 0 1 2; do
  [ -f $P/curated_s$s/manifest.json ] || /usr/bin/time -f "%e s %M KB" -o $P/time_curate_s$s.txt \
    $S curate $P/pool --embeddings $P/emb --out $P/curated_s$s --size $N --seed $s > $P/curate_s$s.log 2>&1
  [ -d $P/random_images_s$s ] || $PY $HERE/curation_stats.py random $P/pool_images $P/random_images_s$s $N $s
  [ -f $P/random_s$s/manifest.json ] || $S shards --folder $P/random_images_s$s $P/random_s$s > /dev/null 2>&1
  $PY $HERE/curation_stats.py stats $P/pool_images $P/curated_s$s $P/random_images_s$s > $P/stats_s$s.json
  for arm in curated random whole; do
    if [ $arm = whole ]; then data=$P/pool; else data=$P/${arm}_s$s; fi
    run=$P/runs/${arm}_s$s
    [ -f $run/export/teacher/model.safetensors ] || {
      $S train recipes/demo_dinov2.yaml data.train=$data data.val=$E/fmnist seed=$s output_dir=$P/runs \
        run_name=${arm}_s$s --resume auto > $P/${arm}_s$s.log 2>&1
      $S export $run > /dev/null 2>&1; }
    knn $run/export/teacher $P/knn_${arm}_s$s.json
  done
done
echo done > $P/DONE
