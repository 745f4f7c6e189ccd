#!/usr/bin/env bash
# Whole-step compile on the CPU (issue 36; README reference row `train.compile_scope=step`). Run from the repository
# root with its .venv; results in $E/static. `sslpipe bench step` of the demo's multi-crop DINOv2 (2x32 + 4x16,
# batch 16, fp32, masks padded to their bound) three ways, one after the other, 3 times: eager, `train.compile=true`
# (each block, the regional compile) and `train.compile_scope=step` (teacher, student and loss as one graph, inductor).
set -u
E=${E:-/work/evidence}; S=$E/static; PY=${PY:-$PWD/.venv/bin/python}
mkdir -p $S
CROPS="crops.n_local=4 crops.global_size=32 crops.local_size=16 dinov2.mask_ratio_min_max=[0.1,0.5]"
for r in 1 2 3; do
  for mode in eager blocks step; do
    case $mode in
      eager) extra="" ;;
      blocks) extra="train.compile=true" ;;
      step) extra="train.compile=true train.compile_scope=step" ;;
    esac
    $PY -m sslpipe bench step --recipe recipes/demo_dinov2.yaml --batch-size 16 --steps 10 --warmup 3 $CROPS \
      dinov2.pad_masked_patches=true $extra --out $S/${mode}_$r.json > $S/${mode}_$r.log 2>&1
  done
done
$PY - $S <<'PY'
import json, statistics as st, sys
for mode in ("eager", "blocks", "step"):
    r = [json.load(open(f"{sys.argv[1]}/{mode}_{i}.json")) for i in (1, 2, 3)]
    ours, bare = [x["ours_ms"] for x in r], [x["bare_ms"] for x in r]
    ratio = [o / b for o, b in zip(ours, bare)]
    print(f"{mode}: ours {st.mean(ours):.1f} +- {st.stdev(ours):.1f} ms, bare {st.mean(bare):.1f} +- "
          f"{st.stdev(bare):.1f} ms, ours / bare {st.mean(ratio):.3f} +- {st.stdev(ratio):.3f}")
PY
