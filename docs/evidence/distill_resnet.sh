#!/usr/bin/env bash
# Distillation evidence, the CNN student (issue 32, docs/distill.md): timm's ResNet-10t (32 px) distilled from the
# SimCLR ResNet-18 teacher (recipes/demo_distill.yaml with the ResNet overrides, 500 steps) vs the same ResNet-10t
# trained by SimCLR (recipes/demo_simclr.yaml, the table's best CNN recipe) for the same 500 steps vs random init;
# seeds 0, 1, 2; kNN on Fashion-MNIST (first 10,000 train / 2,000 val) and digits.
set -u
E=${E:-/work/evidence}; S=${S:-sslpipe}; PY=${PY:-python}; D=$E/distill
T=$E/teacher/simclr_resnet18/export/student
probe() {
  [ -f $D/knn_fm_$2.json ] || $S knn $1 --data $E/fmnist --k 10 20 --max-train 10000 --max-val 2000 --out $D/knn_fm_$2.json > $D/knn_fm_$2.log 2>&1
  [ -f $D/knn_digits_$2.json ] || $S knn $1 --data $E/digits --k 10 20 --out $D/knn_digits_$2.json > $D/knn_digits_$2.log 2>&1
}
[ -f $D/random_resnet/model.safetensors ] || $PY - <<'PY'
import timm, torch
from sslpipe.weights.export import export_backbone
torch.manual_seed(0)
cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0)
export_backbone(cnn, "/work/evidence/distill/random_resnet", arch="resnet10t", model_args={}, img_size=32,
                mean=(0.286,) * 3, std=(0.353,) * 3, source={"which": "random init"})
PY
probe $D/random_resnet random_resnet
for s in 0 1 2; do
  run=$D/runs/resnet_s$s
  [ -f $run/export/student/model.safetensors ] || {
    /usr/bin/time -f "%e s" -o $D/time_resnet_s$s.txt $S train recipes/demo_distill.yaml data.train=$E/fmnist \
      data.val=$E/fmnist distill.teacher=$T seed=$s model.arch=resnet10t model.patch_size=null "model.kwargs={}" \
      crops.global_size=32 eval.resize=32 eval.crop=32 output_dir=$D/runs run_name=resnet_s$s --resume auto \
      > $D/resnet_s$s.log 2>&1
    $S export $run > /dev/null 2>&1; }
  probe $run/export/student resnet_distilled_s$s
  run=$D/runs/resnet_scratch_s$s
  [ -f $run/export/student/model.safetensors ] || {
    /usr/bin/time -f "%e s" -o $D/time_resnet_scratch_s$s.txt $S train recipes/demo_simclr.yaml data.train=$E/fmnist \
      data.val=$E/fmnist seed=$s model.arch=resnet10t train.epochs=5 output_dir=$D/runs run_name=resnet_scratch_s$s \
      --resume auto > $D/resnet_scratch_s$s.log 2>&1
    $S export $run > /dev/null 2>&1; }
  probe $run/export/student resnet_scratch_s$s
done
echo done > $D/DONE_resnet
