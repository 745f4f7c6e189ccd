#!/usr/bin/env bash
# Whole-step compile on the CPU (issue 36; README reference row `train.compile_scope=step`). Run from the repository
# root with its .venv; results in $E/static. `sslpipe bench step --compile` of the demo's multi-crop DINOv2
# (2x32 + 4x16, batch 16, fp32, masks padded to their bound), 3 times: in one command, eager, `train.compile=true`
# (each block, the regional compile) and `train.compile_scope=step` (teacher, student and loss as one graph,
# inductor), each beside the bare network.
set -u
E=${E:-/work/evidence}; S=$E/static; PY=${PY:-$PWD/.venv/bin/python}
mkdir -p $S
for r in 1 2 3; do
  $PY -m sslpipe bench step --compile --recipe recipes/demo_dinov2.yaml --batch-size 16 --steps 10 --warmup 3 \
    crops.n_local=4 crops.global_size=32 crops.local_size=16 dinov2.mask_ratio_min_max=[0.1,0.5] \
    --out $S/compile_$r.json > $S/compile_$r.log 2>&1
done
$PY - $S <<'PY'
import json, statistics as st, sys
r = [json.load(open(f"{sys.argv[1]}/compile_{i}.json")) for i in (1, 2, 3)]
for mode in ("eager", "blocks", "step"):
    ours, bare = [x[mode]["ours_ms"] for x in r], [x[mode]["bare_ms"] for x in r]
    ratio = [o / b for o, b in zip(ours, bare)]
    vs = "" if mode == "eager" else ", / eager {:.3f} +- {:.3f}".format(
        st.mean(x[f"{mode}_over_eager"] for x in r), st.stdev(x[f"{mode}_over_eager"] for x in r))
    print(f"{mode}: ours {st.mean(ours):.1f} +- {st.stdev(ours):.1f} ms, bare {st.mean(bare):.1f} +- "
          f"{st.stdev(bare):.1f} ms, ours / bare {st.mean(ratio):.3f} +- {st.stdev(ratio):.3f}{vs}")
PY
