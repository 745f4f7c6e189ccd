"""The model card of an export folder, so that the folder can be published to a model hub as it is: written by
`export_run` (`sslpipe.weights.run_export`) and `sslpipe import` (`sslpipe.weights.importing`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import yaml

from sslpipe.errors import WriteFailed, io_failure
from sslpipe.weights.export import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_export_config,
)


def write_model_card(out_dir: str | Path, *, title: str, tags: Sequence[str], provenance: Sequence[tuple[str, str]],
                     results: Sequence[tuple[str, str]] = ()) -> Path:
    """Write `README.md` beside an export: the Hugging Face model-card header (`library_name: timm`, tags), how to
    load the folder, where the weights came from (`provenance` rows) and the probe results measured on exactly these
    weights (`results` rows). Everything else is read from its config.json: nothing is guessed. Returns the path."""
    out = Path(out_dir)
    cfg = read_export_config(out)
    header = yaml.safe_dump({"library_name": "timm", "pipeline_tag": "image-feature-extraction",
                             "tags": list(dict.fromkeys(["timm", "sslpipe", *tags]))}, sort_keys=False)
    args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    size, sha = cfg["img_size"], (cfg.get("sha256") or {}).get(WEIGHTS_NAME, "not recorded")
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
        f"pretrained_cfg_overlay=dict(file={WEIGHTS_NAME!r}, custom_load=False), {args}).eval()", "```", "",
        f"Inputs: RGB at {size}x{size} px ({cfg.get('interpolation', 'bicubic')} resize), normalised with mean "
        f"{cfg['mean']} and std {cfg['std']}; `model(x)` gives the image feature. With sslpipe: "
        "`sslpipe.load_backbone(FOLDER)`, `sslpipe knn FOLDER --data SHARDS`, "
        "`sslpipe finetune RECIPE.yaml model.init_from=FOLDER`.", "",
        "## Provenance", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Probe results", "",
        *(["| probe | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in results)] if results else
          ["None recorded for these weights."]), "",
    ]
    card, tmp = out / CARD_NAME, out / (CARD_NAME + ".tmp")
    try:
        tmp.write_text("\n".join(lines))
        tmp.replace(card)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write the model card {card}: {io_failure(err)}. The weights and config.json "
                          "beside it are complete; free space (or fix the disk / permissions) and export "
                          "again") from err
    return card
