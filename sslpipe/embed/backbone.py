"""The backbone of an embedding folder: loaded as the probes load it, checked against the images it will see, and
named by the sha256 of its weights' tensors (so an --out of another backbone is recognised), and the feature spec
recorded beside the embeddings (so a query image is embedded exactly as the set was)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sslpipe.eval.features import prepare_backbone
from sslpipe.eval.spec import FeatureSpec
from sslpipe.weights.export import export_paths
from sslpipe.weights.hashing import sha256_file, tensor_digest

IMAGE_CHANNELS = 3  # the stream decodes every image as RGB (sslpipe.data.stream.decode_sample)


def input_channels(model: nn.Module) -> tuple[str, int] | None:
    """(name, in_channels) of the model's first convolution (a ViT's patch embedding, a CNN's stem); None when it
    has none."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module.in_channels
    return None


def open_backbone(export: str | Path, spec: FeatureSpec) -> nn.Module:
    """The export as the probes run it (a ViT fitted to the spec's crop), refused in one line when it does not take
    the RGB images the shards decode to."""
    model, _ = prepare_backbone(export, spec)
    first = input_channels(model)
    if first is not None and first[1] != IMAGE_CHANNELS:
        name, channels = first
        raise ValueError(f"export {export} takes {channels}-channel images (its first convolution, {name}, has "
                         f"in_channels={channels}), but images are read as RGB ({IMAGE_CHANNELS} channels): use an "
                         f"export trained on {IMAGE_CHANNELS}-channel images")
    return model


def backbone_sha256(export: str | Path) -> str:
    """What identifies the backbone of an embedding folder (embed.json's `backbone_sha256`): the sha256 over the
    tensors of the export's model.safetensors (`tensor_digest`), not over its bytes, which another export of the
    same weights may change (safetensors' metadata order)."""
    return tensor_digest(export_paths(export)[0])


def is_backbone(export: str | Path, recorded: str) -> bool:
    """Whether `export` holds the weights an embedding folder recorded: their tensor digest, or (embed.json of an
    older sslpipe) the sha256 of the model.safetensors file."""
    weights = export_paths(export)[0]
    return recorded in (tensor_digest(weights), sha256_file(weights))


def spec_record(spec: FeatureSpec) -> dict[str, Any]:
    """Every field of `spec` that changes the features, resolved (resize and crop as numbers): embed.json's
    `spec`."""
    return {"img_size": spec.img_size, "resize": spec.short_side, "crop": spec.input_size, "mean": list(spec.mean),
            "std": list(spec.std), "pooling": spec.pooling, "layers": spec.layers, "precision": spec.precision}


def spec_from_record(record: dict[str, Any], **execution: Any) -> FeatureSpec:
    """The FeatureSpec an embedding folder was written with, run with `execution` (batch_size, num_workers,
    device: what does not change the features)."""
    return FeatureSpec(**record, **{k: v for k, v in execution.items() if v is not None})
