#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a device session: downloads into .whl/ (git-ignored through
# .git/info/exclude) the Python 3.12 wheels of sslpipe's dependencies that the device image lacks, at the versions of
# this checkout's .venv (what CI tests), their dependencies included. The image has torch, timm, accelerate,
# torchvision, transformers, scipy, scikit-learn, numpy, ... (/work/.library/device/KINDS.md); faiss-gpu's wheel is too
# large to carry, so kNN runs on its torch backend there. Then run docs/evidence/gpu_issue36.sh as it says.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info && touch .git/info/exclude
for d in /.whl/ /.whl_wandb/ /.fmnist/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .whl_wandb .fmnist
cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/  # 30 MB, for the quality run (apt-get install dataset-fashion-mnist)
# The image's packages (KINDS.md, 2026-11-17), normalised; everything else sslpipe needs is carried, and timm
# (crop packing needs >= 1.0.24; the image's version is not known).
ON_DEVICE="accelerate aiohttp anyio attrs certifi charset-normalizer click cloudpickle filelock fsspec h11
httpcore httpx huggingface-hub idna jinja2 joblib lightning lightning-utilities markupsafe
matplotlib networkx numpy onnx onnxruntime onnxscript opencv-python-headless packaging pandas pillow
platformdirs protobuf psutil pyarrow pytest pytest-timeout python-dateutil pytorch-lightning pyyaml
regex requests rich safetensors scikit-image scikit-learn scipy six sympy tifffile tokenizers
torch torchaudio torchmetrics torchvision tqdm transformers triton typing-extensions urllib3 xxhash
pygments iniconfig pluggy typer setuptools wheel"
.venv/bin/python - "$ON_DEVICE" > .whl/wanted.txt <<'PY'
import re, sys
from importlib.metadata import distribution, PackageNotFoundError
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(n) for n in sys.argv[1].split()}
todo, seen = ["lightly", "webdataset", "wandb", "pydantic", "braceexpand", "pycocotools", "timm"], {}
while todo:
    name = norm(todo.pop())
    if name in seen or name in have:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        continue
    seen[name] = dist.version
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PY
while read -r spec; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec" 2>/dev/null \
    || .venv/bin/python -m pip wheel -q --no-deps -w .whl "$spec"  # a pure-Python sdist: build its wheel here
done < .whl/wanted.txt
mv .whl/wandb-*.whl .whl_wandb/  # 20 MB: only the suite needs it; the quality run carries the data instead
du -sh .whl .whl_wandb .fmnist  # a call carries at most 64 MiB with the working tree (~12 MB)
