"""An export folder as `model.onnx` for inference runtimes, with dynamic batch, height and width (`sslpipe onnx`,
`sslpipe export RUN --onnx`).

A ViT that accepts other image sizes is the usual ONNX failure: the legacy TorchScript exporter (`dynamo=False`)
traces the position-embedding resampling as a constant of the trace size, and the graph then fails at any other size
(dinov2#216, NVIDIA/TensorRT#4558). The torch.export-based exporter (`dynamo=True`, the default since torch 2.9) keeps
the input's H and W symbolic (`dynamic_shapes`), and timm's `dynamic_img_size` ViTs resample with
`F.interpolate(bicubic, antialias=True)`, which the exporter writes as one ONNX `Resize` (cubic, cubic_coeff_a=-0.5,
antialias=1, exclude_outside=1) whose output size is computed from the input's shape at run time. So no wrapper is
needed: the graph is timm's own forward, traced at a size other than the export's (`_trace`).

What equals what: the reference is the torch model exactly as sslpipe loads it, `load_backbone(export)(x)` (float32,
eval). At the export's `img_size` that uses the trained position grid as it is (the in-graph resize to the same grid
is the identity); at any other size, timm's rule above. That equals the rule the network was trained with only for
`antialias` exports (DINOv2 register imports, timm's); sslpipe's runs and the DINO, iBOT and register-free DINOv2
imports train with the official rule (bicubic, scale factor (n + 0.1) / N, `sslpipe.weights.positions`), MAE with
bicubic without antialias: at sizes other than `img_size` those networks, in torch and in ONNX alike, differ from the
original. Every file is checked after writing: onnxruntime against torch at the export's size (batch 2) and at
another size whose H and W differ from it and from each other (batch 1), max abs diff <= `atol`.

Opset 18 (`OPSET`): the first with Resize antialias, and the opset torch's exporter implements natively; a lower one
is refused (the exporter would convert down and may silently keep 18). The file has one input `images` (N x 3 x H x W
float32, normalised with the export's mean and std; for a ViT, H and W multiples of the patch size, as in torch) and
one output `features` (what `load_backbone(export)(x)` returns); the export's config.json is in the model's metadata.
Weights above `ONE_FILE_BYTES` go to `model.onnx.data` beside it (an ONNX file ends at 2 GiB). Checked with
onnxruntime only: a runtime without Resize antialias (TensorRT 10.0 refused it, NVIDIA/TensorRT#3560) runs the CNNs
but not the ViTs.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslpipe.errors import WriteFailed, io_failure
from sslpipe.weights.export import export_paths, load_backbone, rewrite_config
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.positions import export_position_rule

ONNX_NAME = "model.onnx"
OPSET = 18
DYNAMIC = ("batch", "height", "width")
INPUT, OUTPUT = "images", "features"
ONE_FILE_BYTES = 3 << 29  # 1.5 GiB of weights: a larger model keeps them in model.onnx.data
_TIMM_RULE = ("resampled in the graph from the trained grid to (H / patch, W / patch): bicubic with antialias, as "
              "timm's resample_abs_pos_embed (what load_backbone computes)")


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured, for the command's output."""
    path: Path
    opset: int
    diffs: dict[str, float]  # input shape -> max abs diff onnxruntime vs torch
    notes: list[str]  # how a ViT's position embedding is resized

    def lines(self) -> list[str]:
        checked = ", ".join(f"{d:.2g} at {shape}" for shape, d in self.diffs.items())
        return [f"wrote {self.path} (ONNX opset {self.opset}; dynamic {', '.join(DYNAMIC)}; input `{INPUT}` "
                f"N x 3 x H x W, normalised by config.json's mean and std; output `{OUTPUT}`)",
                f"onnxruntime vs torch (load_backbone): max abs diff {checked}", *self.notes]


def require_onnx() -> Any:
    """onnxruntime, after checking that torch's exporter has its packages: one line naming a missing one."""
    try:
        import onnx  # noqa: F401 - torch's exporter writes with onnxscript and onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ValueError(f"ONNX export needs {err.name}: pip install 'sslpipe[onnx]'") from err
    return onnxruntime


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _check_inputs(model: nn.Module, size: int) -> list[Tensor]:
    """The export's size (batch 2) and another H x W, both other than it and each other, multiples of the patch."""
    patch = int(getattr(getattr(model, "patch_embed", None), "patch_size", (1,))[0])
    other = [patch * math.ceil(size * f / patch) for f in (1.5, 1.25)]
    if other[1] == other[0]:  # a small export: both round to the same patch count
        other[1] += patch
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, size, size, generator=gen), torch.randn(1, 3, *other, generator=gen)]


def _position_notes(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """How the graph resizes a ViT's position embedding, and whether that is the rule the network trained with."""
    if not isinstance(getattr(model, "pos_embed", None), Tensor):
        return []
    rule = export_position_rule(config, getattr(model, "reg_token", None) is not None)
    same = "the rule this network was trained with" if rule == "antialias" else (
        f"not the `{rule}` rule this network was trained with (sslpipe.weights.positions): at sizes other than "
        f"{config['img_size']} it differs from the original, in torch as in ONNX")
    return [f"position embedding: {_TIMM_RULE}; {same}"]


def _trace(model: nn.Module, arch: str, hw: tuple[int, int], opset: int) -> Any:
    """torch.export-based ONNX program with symbolic batch, height and width, traced at batch 2 (torch.export
    specialises a dimension of size 1) and `hw`, not the export's size: a timm whose resample_abs_pos_embed returns the
    trained grid as it is at its own size even while exporting would otherwise trace no resize at all."""
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    try:
        return torch.onnx.export(model, (torch.randn(2, 3, *hw),), dynamo=True, opset_version=opset,
                                 input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=(dims,), verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; one line says which architecture
        raise ValueError(f"{arch} cannot be exported to ONNX with dynamic batch, height and width by torch "
                         f"{torch.__version__}: {_first_line(err)}") from err


def _compare(ort: Any, path: Path, inputs: list[Tensor], expected: list[Tensor], atol: float) -> dict[str, float]:
    """Max abs diff of onnxruntime against torch per input; a ValueError at the first one over `atol`."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # an error is raised with its message; buffer re-use notices are no problem
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    diffs = {}
    for x, want in zip(inputs, expected):
        shape = "x".join(map(str, x.shape))
        try:
            got = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
        except Exception as err:  # noqa: BLE001 - onnxruntime's own error types; the usual one is a baked size
            raise ValueError(f"the ONNX model fails at input {shape} where torch runs (onnxruntime: "
                             f"{_first_line(err)}); nothing was written") from err
        diffs[shape] = (got - want).abs().max().item() if got.shape == want.shape else math.inf
        if not diffs[shape] <= atol:
            raise ValueError(f"the ONNX model does not match torch at input {shape}: max abs diff {diffs[shape]:.3g}"
                             f" > {atol:g} (shape {tuple(got.shape)} vs {tuple(want.shape)}); nothing was written")
    return diffs


def export_onnx(export_dir: str | Path, out_path: str | Path | None = None, *, opset: int = OPSET,
                atol: float = 1e-4) -> OnnxExport:
    """Write the export's backbone as `model.onnx` beside it (or at `out_path`), check it with onnxruntime against
    `load_backbone(export_dir)` and record it in the export's config.json (`"onnx": file, opset, sha256 of each file
    written, dynamic axes, the diffs measured`). A ValueError in one line when the onnx packages are missing, the
    architecture cannot be exported with dynamic sizes or the outputs differ; nothing is left half-written."""
    ort = require_onnx()
    if opset < OPSET:
        raise ValueError(f"opset {opset}: ONNX export needs opset >= {OPSET} (Resize with antialias)")
    weights, config_path = export_paths(export_dir)
    config = json.loads(config_path.read_text())
    model, size, arch = load_backbone(weights.parent), int(config["img_size"]), config["architecture"]
    inputs, notes = _check_inputs(model, size), _position_notes(model, config)
    try:
        with torch.no_grad():
            expected = [model(x).float() for x in inputs]
    except Exception as err:  # noqa: BLE001 - a fixed-size model refuses other sizes in its own way
        raise ValueError(f"{arch} with {config['model_args']} does not accept other image sizes in torch "
                         f"({_first_line(err)}): it cannot be exported with dynamic height and width") from err
    out = Path(out_path) if out_path is not None else weights.parent / ONNX_NAME
    tmp = out.parent / f".{out.name}.tmp"  # a folder, so that model.onnx.data keeps the name model.onnx refers to
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        program = _trace(model, arch, tuple(inputs[1].shape[2:]), opset)
        opset = program.model.opset_imports[""]  # what the file holds
        program.model.metadata_props.update({
            "sslpipe_config": json.dumps(config), "opset": str(opset), "dynamic": ",".join(DYNAMIC),
            "position_embedding": notes[0] if notes else "none"})
        program.save(str(tmp / out.name), external_data=sum(t.nbytes for t in model.state_dict().values())
                     > ONE_FILE_BYTES)
        diffs = _compare(ort, tmp / out.name, inputs, expected, atol)
        written = sorted(tmp.iterdir())
        digests = {p.name: sha256_file(p, sync=True) for p in written}
        out.with_name(out.name + ".data").unlink(missing_ok=True)  # an earlier, larger model's weights
        for p in written:
            p.replace(out.parent / p.name)
    except Exception as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write {out}: {io_failure(err)}. Removed its temporary files") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    inside = out.resolve().parent == weights.parent.resolve()
    config["onnx"] = {"file": out.name if inside else str(out.resolve()), "opset": opset, "sha256": digests,
                      "dynamic": list(DYNAMIC), "max_abs_diff": diffs}
    rewrite_config(config_path, config)
    return OnnxExport(out, opset, diffs, notes)
