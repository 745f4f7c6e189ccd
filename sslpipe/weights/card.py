"""The model card of an export folder, so that the folder can be published to a model hub as it is: written by
`export_run` (`sslpipe.weights.run_export`) and `sslpipe import` (`sslpipe.weights.importing`)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import yaml

from sslpipe.weights.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
)


def model_card(cfg: Mapping[str, Any], *, title: str, tags: Sequence[str], provenance: Sequence[tuple[str, str]],
               results: Sequence[tuple[str, str]] = ()) -> str:
    """The model card of the export whose config.json is `cfg`: the Hugging Face model-card header (`library_name:
    timm`, tags), how to load the folder, where the weights came from (`provenance` rows) and the probe results
    measured on exactly these weights (`results` rows). Everything else is read from `cfg`: nothing is guessed."""
    header = yaml.safe_dump({"library_name": "timm", "pipeline_tag": "image-feature-extraction",
                             "tags": list(dict.fromkeys(["timm", "sslpipe", *tags]))}, sort_keys=False)
    args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    size, sha = cfg["img_size"], (cfg.get("sha256") or {}).get(WEIGHTS_NAME, "not recorded")
    interpolation = cfg.get("interpolation", "bicubic")
    # the data config too: timm's own pipeline (`resolve_data_config(model=model)`) then normalises as the export
    data = (f"mean={tuple(cfg['mean'])!r}, std={tuple(cfg['std'])!r}, input_size={(3, size, size)!r}, "
            f"interpolation={interpolation!r}")
    rows = [("architecture", f"`{cfg['architecture']}`, model_args `{json.dumps(cfg['model_args'])}`"),
            *provenance, ("weights", f"`{WEIGHTS_NAME}`, sha256 `{sha}`"),
            ("exported", f"{cfg.get('created_at', '?')} by sslpipe {cfg.get('sslpipe_version', '?')}")]
    lines = [
        "---", header.strip(), "---", "", f"# {title}", "",
        f"A `{cfg['architecture']}` image backbone ({cfg.get('num_features')}-d features) exported by sslpipe: "
        f"`{WEIGHTS_NAME}` holds the weights (no classifier), `{CONFIG_NAME}` the architecture, its model "
        "arguments, the input size and the normalisation.", "",
        "## Use", "", "```python", "import timm", "",
        f"model = timm.create_model({cfg['architecture']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={WEIGHTS_NAME!r}, custom_load=False, {data}), {args}).eval()",
        "data_config = timm.data.resolve_data_config(model=model)  # the size and normalisation below", "```", "",
        f"Inputs: RGB at {size}x{size} px ({interpolation} resize), normalised with mean "
        f"{cfg['mean']} and std {cfg['std']}; `model(x)` gives the image feature. With sslpipe: "
        "`sslpipe.load_backbone(FOLDER)`, `sslpipe knn FOLDER --data SHARDS`, "
        "`sslpipe finetune RECIPE.yaml model.init_from=FOLDER`.", "",
        "## Provenance", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Probe results", "",
        *(["| probe | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in results)] if results else
          ["None recorded for these weights."]), "",
    ]
    return "\n".join(lines)

