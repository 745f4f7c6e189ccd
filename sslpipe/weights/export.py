"""The export folder: a backbone as plain timm weights, written, checked and read back (docs/internals.md §6).

An export folder holds `model.safetensors` (the plain timm model's state dict, no pickles) and `config.json` (timm
architecture name + the model arguments that re-create it, image size, normalisation, where the weights came from,
the sha256 of `model.safetensors`, and `config_sha256`, the digest of config.json's own content; `sslpipe check`
compares both). All files are written under temporary names and renamed together (`staged_export`); a failed write
or check removes them and leaves an earlier export as it was. A file, or a folder that holds no sslpipe export but
files it would replace (`sslpipe export`: any file), is refused as the output unless forced. `export_run`
(`sslpipe.weights.run_export`) and `sslpipe import` (`sslpipe.weights.importing`) also write `README.md`, a model
card (`sslpipe.weights.card`), so the folder can be published to a model hub as it is. It loads in plain timm,
without sslpipe:

    timm.create_model(cfg["architecture"], pretrained=True,
                      pretrained_cfg_overlay=dict(file=".../model.safetensors", custom_load=False, mean=cfg["mean"],
                                                  std=cfg["std"], input_size=(3, cfg["img_size"], cfg["img_size"]),
                                                  interpolation=cfg["interpolation"]),
                      **cfg["model_args"])

(`model_args` holds `num_classes=0`; `custom_load=False`: timm before 1.0.31 otherwise hands a ViT's file to its JAX
`.npz` reader, as its published ViT configs ask). timm reads a `file` overlay from disk (no download is attempted);
since `num_classes=0` differs from the architecture's default pretrained config it drops classifier keys and loads
non-strictly, so `load_backbone` loads strictly itself, and the staged export is checked before it replaces anything
by reloading it and comparing outputs.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sslpipe.errors import WriteFailed, io_failure
from sslpipe.files import set_default_mode, with_digest, write_text_atomic
from sslpipe.weights.hashing import sha256_file, tensor_digest
from sslpipe.weights.positions import export_position_rule, fit_position_grid

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT = "sslpipe-backbone/1"
CONFIG_DIGEST = "config_sha256"  # config.json: the sha256 of its own canonical JSON without this key
# The one metadata entry of the safetensors files an export writes: safetensors writes a map of several in a
# per-process random order, so the same weights would get another file sha256 in another process.
SAFETENSORS_METADATA = {"format": "pt"}
# Keys that belong to the training wrapper, never to the timm model (iBOT's learnable mask token).
TRAINING_ONLY_KEYS = ("mask_token",)


def _version() -> str:
    try:
        return metadata.version("sslpipe")
    except metadata.PackageNotFoundError:
        return "unknown"


def is_dinov3_vit(arch: str) -> bool:
    """timm's DINOv3 rotary ViTs, `vit_*_dinov3` and `vit_*_dinov3_qkvb`: their feature is the [CLS] token, as
    upstream, where timm pools the patch tokens by default."""
    return arch.removesuffix("_qkvb").endswith("_dinov3")


def create_timm_backbone(arch: str, img_size: int, patch_size: int | None, kwargs: Mapping[str, Any]
                         ) -> tuple[nn.Module, dict[str, Any]]:
    """Create `arch` the way `create_backbone` does (ViTs: img_size, patch_size, dynamic_img_size) and return the
    model with the exact timm arguments; architectures without `img_size` (CNNs) are retried without it."""
    vit_args: dict[str, Any] = {"img_size": img_size, "dynamic_img_size": True}
    if patch_size:
        vit_args["patch_size"] = patch_size
    if is_dinov3_vit(arch):
        vit_args["global_pool"] = "token"  # the [CLS] feature, as create_backbone builds DINOv3 (timm: avg)
    args = {**vit_args, **kwargs, "num_classes": 0}
    try:
        return timm.create_model(arch, pretrained=False, **args), args
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
    args = {**kwargs, "num_classes": 0}
    return timm.create_model(arch, pretrained=False, **args), args


class StagedExport:
    """The new files of an export folder, written beside the old ones under temporary names (`.tmp-NAME`) and renamed
    into place together once all are written: an error or a full disk before that (heads refused, the model card's
    inputs unreadable, the weights failing their check) leaves the earlier export -- weights, heads, config.json and
    model card -- as it was. config.json goes last: until it is replaced, `sslpipe check` sees the half-swapped
    folder (a hard kill) as damaged. `export_run` fills one through `staged_export`."""

    def __init__(self, out: Path, config: dict[str, Any], previous: dict[str, Any]) -> None:
        self.out, self.config, self.previous = out, config, previous
        self.names: list[str] = []  # written so far, renamed in this order
        self.card: Callable[[dict[str, Any]], str] | None = None  # the model card from the final config
        self.same_weights = False  # the folder already held these weights (its ONNX graph and heads still hold)

    def tmp(self, name: str) -> Path:
        return self.out / f".tmp-{name}"

    def write(self, name: str, write: Callable[[Path], None]) -> None:
        """Write `name` through `write(temporary path)`, with the umask's mode, and record its sha256."""
        self.names.append(name)
        write(self.tmp(name))
        set_default_mode(self.tmp(name))
        self.config.setdefault("sha256", {})[name] = sha256_file(self.tmp(name))

    def commit(self) -> list[Path]:
        """config.json (with its own digest) and the card from it, then every file renamed into place; returns the
        earlier export's ONNX graph and heads that these other weights make stale (the caller removes them)."""
        config = with_digest(self.config, CONFIG_DIGEST)
        self.names.append(CONFIG_NAME)
        self.tmp(CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if self.card is not None:
            self.names.insert(-1, CARD_NAME)
            self.tmp(CARD_NAME).write_text(self.card(config))
        stale = [] if self.same_weights else [p for p in _derived_files(self.out, self.previous)
                                              if p.name not in self.names]
        for name in self.names:
            self.tmp(name).replace(self.out / name)
        return stale

    def discard(self) -> None:
        for name in self.names:
            self.tmp(name).unlink(missing_ok=True)


_EXPORT_NAMES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, "heads.safetensors")


def _refuse_foreign(out: Path, force: bool, exclusive: bool) -> dict[str, Any]:
    """The config.json of the export in `out` ({} when none). A file, or a folder that holds no sslpipe export but
    files the export would replace (another tool's weights and config.json, a user's README.md, a git-lfs pointer)
    -- with `exclusive` (`sslpipe export`), any file -- is refused unless `force`, so nothing of theirs is
    overwritten, or removed as a stale ONNX graph or heads."""
    named = f"--out {out}" if exclusive else str(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{named} is a file, not a folder: name a new or empty folder for the export")
    previous = _previous_config(out)
    if previous.get("format") == FORMAT or force or not out.is_dir():
        return previous if previous.get("format") == FORMAT else {}
    leftovers = {f".tmp-{name}" for name in _EXPORT_NAMES}  # of a hard-killed export
    theirs = sorted(p.name for p in out.iterdir() if p.name not in leftovers
                    and (exclusive or p.name in _EXPORT_NAMES))
    if theirs:
        listed = ", ".join(theirs[:5]) + (" ..." if len(theirs) > 5 else "")
        raise ValueError(f"{named} holds {listed} but no sslpipe export (no config.json with \"format\": "
                         f"\"{FORMAT}\"): name a new or empty folder" + (
                             " (`sslpipe export --force` writes into it anyway, replacing its files of the export's "
                             "names)" if exclusive else ", so that none of these files is replaced"))
    return {}


@contextmanager
def _write_failure(out: Path) -> Iterator[None]:
    """A failed write (disk full, I/O error, no permission; safetensors' wrapped ones too) as one `WriteFailed`
    naming the export."""
    try:
        yield
    except Exception as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write the export {out}: {io_failure(err)}. Removed its temporary files; an "
                          f"earlier export there is as it was. Free space (or fix the disk / permissions) and "
                          "export again") from err


@contextmanager
def staged_export(
    module: nn.Module,
    out_dir: str | Path,
    *,
    arch: str,
    model_args: Mapping[str, Any],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    source: Mapping[str, Any],
    force: bool = False,
    exclusive: bool = False,
) -> Iterator[StagedExport]:
    """Stage `module` (a plain timm model) as `out_dir/model.safetensors` + `config.json`, checked by reloading it
    from the staged files; the caller may add files (`heads.stage_heads`) and the model card (`.card`); leaving the
    block renames everything into place, an exception removes the staged files. Keys named `mask_token`
    (training-only, iBOT) are stripped; `model_args` are the keyword arguments of `timm.create_model(arch, ...)`
    (num_classes is forced to 0). A file, or a folder that is no sslpipe export and holds files of the export's
    names (`exclusive`: any file), is refused unless `force`."""
    out = Path(out_dir)
    previous = _refuse_foreign(out, force, exclusive)
    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in module.state_dict().items()
        if k.split(".")[-1] not in TRAINING_ONLY_KEYS
    }
    config = {
        "format": FORMAT,
        "architecture": arch,
        "model_args": {**dict(model_args), "num_classes": 0},
        "num_features": int(getattr(module, "num_features", 0)),
        "img_size": int(img_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": "bicubic",
        "source": dict(source),
        "sslpipe_version": _version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    staged = StagedExport(out, config, previous)
    try:
        with _write_failure(out):
            out.mkdir(parents=True, exist_ok=True)
            staged.write(WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=SAFETENSORS_METADATA))
            config["tensor_digest"] = tensor_digest(staged.tmp(WEIGHTS_NAME))
        staged.same_weights = bool(previous) and config["tensor_digest"] == weights_digest(out, previous)
        if staged.same_weights:
            _carry_derived(previous, config)
        _verify(module, staged.tmp(WEIGHTS_NAME), config, out)
        yield staged
        with _write_failure(out):
            stale = staged.commit()
    except BaseException:
        staged.discard()
        raise
    for path in stale:
        path.unlink()
    if stale:
        print(f"{out}: removed {', '.join(p.name for p in stale)} of the export these weights replace (write them "
              "again with --onnx / --with-heads)", file=sys.stderr)


def export_backbone(
    module: nn.Module,
    out_dir: str | Path,
    *,
    arch: str,
    model_args: Mapping[str, Any],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    source: Mapping[str, Any],
    force: bool = False,
) -> Path:
    """Write `module` (a plain timm model) as `out_dir/model.safetensors` + `config.json` (`staged_export`, nothing
    added). Returns `out_dir`."""
    with staged_export(module, out_dir, arch=arch, model_args=model_args, img_size=img_size, mean=mean, std=std,
                       source=source, force=force):
        pass
    return Path(out_dir)


def weights_digest(out: Path, config: dict[str, Any] | None = None) -> str | None:
    """The `tensor_digest` of the weights in the export folder `out`: as its config.json (or `config`) records it,
    computed for an export of an older sslpipe; None without weights, or with a file safetensors cannot read."""
    recorded = (config if config is not None else _previous_config(out)).get("tensor_digest")
    if recorded or not (out / WEIGHTS_NAME).is_file():
        return recorded
    try:
        return tensor_digest(out / WEIGHTS_NAME)
    except Exception:  # noqa: BLE001 -- safetensors raises its own error type for any unreadable file
        return None


def _previous_config(out: Path) -> dict[str, Any]:
    """The config.json of the export already in `out` ({} when there is none or it is unreadable)."""
    try:
        previous = json.loads((out / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _carry_derived(previous: dict[str, Any], config: dict[str, Any]) -> None:
    """Keep the records of the ONNX graph and heads of the same weights exported again."""
    for key in ("onnx", "heads"):
        if isinstance(previous.get(key), dict):
            config[key] = previous[key]
    heads = (previous.get("heads") or {}).get("file") if isinstance(previous.get("heads"), dict) else None
    if heads and heads in (previous.get("sha256") or {}):
        config["sha256"][heads] = previous["sha256"][heads]


def _derived_files(out: Path, previous: dict[str, Any]) -> list[Path]:
    """The files an earlier sslpipe export in `out` wrote from its weights (its ONNX graph and heads, recorded in its
    config.json or under their usual names): stale once other weights are written there, so removed. None when
    `out` held no sslpipe export (`previous` empty): those files are someone else's."""
    if not previous:
        return []
    names = {"model.onnx", "model.onnx.data", "heads.safetensors"}
    onnx, heads = previous.get("onnx"), previous.get("heads")
    names |= set((onnx.get("sha256") or {}) if isinstance(onnx, dict) else ())
    names.add(heads.get("file") if isinstance(heads, dict) else None)
    # plain names only: a config.json naming `../x` must not reach outside the folder
    return sorted(out / name for name in names if name and Path(name).name == name and (out / name).is_file())


@torch.no_grad()
def _verify(module: nn.Module, weights: Path, config: Mapping[str, Any], out: Path) -> None:
    """Reload the staged weights as `load_backbone` will and compare outputs on one random batch: catches wrong keys
    or model arguments before anything replaces an earlier export."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        reloaded = _build(config, weights, out / CONFIG_NAME).to(device).eval()
    except RuntimeError as err:
        raise RuntimeError(f"export check failed: the weights written for {out} do not load back: "
                           f"{str(err).replace(str(weights), WEIGHTS_NAME)}") from err
    was_training = module.training
    module.eval()
    try:
        size = config["img_size"]
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        expected, got = module(x).float(), reloaded(x).float()
    finally:
        module.train(was_training)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"export check failed: {out} reloaded with timm gives different outputs "
            f"(max abs diff {(expected - got).abs().max().item():.3g}); model_args in {out / CONFIG_NAME} are wrong"
        )


def _open_export(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """(model.safetensors, config.json, its content) of an sslpipe export folder, or of the folder holding its
    model.safetensors. Anything else is refused in one line that says what it is: a missing path, another file (a
    checkpoint to import, the export's ONNX graph), or a folder whose config.json is not an sslpipe export's (a
    Hugging Face / timm download, which `sslpipe import` brings in)."""
    path = Path(path)
    if path.is_file() and path.name != WEIGHTS_NAME:
        if _previous_config(path.parent).get("format") == FORMAT:
            raise ValueError(f"{path} is a file of the export {path.parent}: pass the export folder {path.parent}")
        raise ValueError(f"{path} is a file, not an sslpipe export folder (config.json + {WEIGHTS_NAME}): pass an "
                         f"export folder, or bring a checkpoint in with `sslpipe import {path} OUT`")
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    config_path = weights.parent / CONFIG_NAME
    for p in (weights, config_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: pass an export folder written by `sslpipe export` (or "
                                    "`sslpipe import`)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path} is unreadable ({err}): export or import the backbone again") from err
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        newer = isinstance(found, str) and found.startswith(FORMAT.split("/")[0] + "/")
        raise ValueError(f"{weights.parent} is an export of format {found!r}, and this sslpipe reads {FORMAT!r}: "
                         "upgrade sslpipe" if newer else
                         f"{weights.parent} is not an sslpipe export (its {CONFIG_NAME} has no \"format\": "
                         f"\"{FORMAT}\"; a Hugging Face / timm download?): bring it in with `sslpipe import "
                         f"{weights.parent} OUT` and pass OUT")
    return weights, config_path, config


def export_paths(path: str | Path) -> tuple[Path, Path]:
    """(model.safetensors, config.json) of an export folder, or of the folder holding the given weights file;
    anything that is not an sslpipe export is refused in one line (`_open_export`)."""
    return _open_export(path)[:2]


def read_export_config(path: str | Path) -> dict[str, Any]:
    """`config.json` of an export folder (or of the folder holding `model.safetensors`), checked as `export_paths`
    checks it."""
    return _open_export(path)[2]


def load_backbone(path: str | Path) -> nn.Module:
    """Re-create the timm model from `config.json` and load `model.safetensors` strictly; eval mode.

    The data config (mean, std, input size, interpolation) is written into `model.pretrained_cfg`, so
    `timm.data.resolve_data_config(model=...)` gives the normalisation the backbone was trained with.
    """
    weights, config_path, cfg = _open_export(path)
    model = _build(cfg, weights, config_path)
    size = cfg["img_size"]
    model.pretrained_cfg = {
        **model.pretrained_cfg, "file": str(weights), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
        "input_size": (3, size, size), "interpolation": cfg.get("interpolation", "bicubic"), "num_classes": 0,
    }
    return model.eval()


def _build(cfg: Mapping[str, Any], weights: Path, config_path: Path) -> nn.Module:
    """The timm model of an export's config, `weights` loaded strictly."""
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{weights} does not match {cfg['architecture']} with {config_path} model_args: {err}")
    return model


def rewrite_config(config_path: Path, config: Mapping[str, Any]) -> None:
    """Replace an export's config.json atomically, with its own digest recomputed (`sslpipe check` compares it)."""
    write_text_atomic(config_path, json.dumps(with_digest(dict(config), CONFIG_DIGEST), indent=2) + "\n")


def some_keys(keys: Sequence[str], n: int) -> str:
    """The first `n` keys and how many more: error messages name enough keys to recognise a layout, not all."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def key_mismatches(state: Mapping[str, torch.Tensor], module: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(keys of `module` missing from `state`, keys of `state` not in `module`, "key (shape) vs (shape)" of the
    keys whose shapes differ), each sorted: all empty when `state` loads strictly."""
    target = module.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in sorted(set(state) & set(target))
              if state[k].shape != target[k].shape]
    return sorted(set(target) - set(state)), sorted(set(state) - set(target)), shapes


def load_export_into(module: nn.Module, path: str | Path) -> list[str]:
    """Copy the weights of an export folder into a plain timm backbone of the same architecture (`model.init_from`:
    fine-tuning, continued pretraining), tensor for tensor. A ViT built for another image size gets the export's
    position grid resampled by the rule the export's network was trained with (`sslpipe.weights.positions`); another
    patch size, or any other key or shape that differs, is refused with one ValueError naming the export. Returns
    notes on what was adapted."""
    weights, _, cfg = _open_export(path)
    state = load_file(str(weights))
    patch = state.get("patch_embed.proj.weight")
    own = getattr(getattr(module, "patch_embed", None), "patch_size", None)
    if patch is not None and own is not None and tuple(patch.shape[-2:]) != tuple(own):
        raise ValueError(f"model.init_from={path}: its patches are {patch.shape[-1]} px, the network built here has "
                         f"{own[0]} px patches; a patch size cannot be resampled: set model.patch_size="
                         f"{patch.shape[-1]}")
    notes = fit_position_grid(state, module, export_position_rule(cfg, "reg_token" in state))
    missing, unexpected, shapes = key_mismatches(state, module)
    if missing or unexpected or shapes:
        problems = [f"missing in the export: {some_keys(missing, 8)}" if missing else "",
                    f"not in the backbone: {some_keys(unexpected, 8)}" if unexpected else "",
                    f"shape export vs backbone: {some_keys(shapes, 8)}" if shapes else ""]
        raise ValueError(
            f"export {path} ({cfg.get('architecture')} with model_args {cfg.get('model_args')}) does not fit the "
            f"{type(module).__name__} backbone to initialise: " + "; ".join(p for p in problems if p)
            + ". Build the backbone with the export's architecture and model arguments (model.arch, "
            "model.patch_size, model.kwargs)"
        )
    _refuse_other_attributes(module, cfg, path)
    module.load_state_dict(state, strict=True)
    return notes


def _invisible_attributes(module: nn.Module) -> dict[str, tuple[str, Any]]:
    """What of `module` no weight shape shows, as {what: (the key that sets it, value)}: heads per attention, RoPE
    base and period range, norm eps, the pooling of the feature."""
    out: dict[str, tuple[str, Any]] = {}
    for name, sub in module.named_modules():
        where = name or "the model"
        heads = getattr(sub, "num_heads", None)
        if isinstance(heads, int):
            out[f"num_heads of {where}"] = ("model.kwargs.num_heads", heads)
        for attr, key in (("temperature", "model.kwargs.rope_temperature"), ("min_period", None),
                          ("max_period", None)):
            value = getattr(sub, attr, None)
            if re.search("rope|rotary", type(sub).__name__, re.I) and isinstance(value, (int, float)):
                out[f"RoPE {attr} of {where}"] = (key or "model.arch", float(value))
        eps = getattr(sub, "eps", None)
        if isinstance(sub, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) and isinstance(eps, float):
            out[f"norm eps of {where}"] = ("model.arch", eps)
    pool = getattr(module, "global_pool", None)
    if isinstance(pool, str):
        out["global_pool"] = ("model.kwargs.global_pool", pool)
    return out


def _refuse_other_attributes(module: nn.Module, cfg: Mapping[str, Any], path: str | Path) -> None:
    """Refuse, in one line, a backbone whose heads, RoPE base, norm eps or pooling differ from the export's network
    (built from its config.json on the meta device): the weights would load and compute something else. An export
    whose config timm no longer builds is let through, checked by its keys and shapes alone."""
    try:
        with torch.device("meta"):
            theirs = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
    except Exception:  # noqa: BLE001 -- any failure to rebuild it only skips this extra check
        return
    ours, recorded = _invisible_attributes(module), _invisible_attributes(theirs)
    for what, (key, value) in recorded.items():
        if what in ours and ours[what][1] != value:
            fix = (f"set {key}={value}" if key != "model.arch" else
                   f"build model.arch={cfg['architecture']} with the export's model_args")
            raise ValueError(f"model.init_from={path}: the export's network has {what} = {value}, the backbone "
                             f"built here {ours[what][1]} (no weight shape shows it, so the weights would load and "
                             f"compute something else): {fix}")
