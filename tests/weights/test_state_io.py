"""Checkpoint state without pickles: optimizer, RNG and scaler round trips."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslpipe.weights import state_io


def _trained(opt_cls, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = opt_cls([{"params": net[0].parameters(), "lr_scale": 0.5, "apply_wd": True},
                   {"params": net[2].parameters(), "lr_scale": 1.0, "apply_wd": False}], lr=0.1, **kw)
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.AdamW, {"betas": (0.9, 0.95)}),
                                         (torch.optim.SGD, {"momentum": 0.9})])
def test_optimizer_round_trip_continues_identically(tmp_path: Path, opt_cls, kw) -> None:
    net, opt = _trained(opt_cls, **kw)
    state_io.save_optimizer_state(opt.state_dict(), tmp_path / "opt.safetensors")
    twin, twin_opt = _trained(opt_cls, **kw)
    twin_opt.state.clear()
    state_io.load_optimizer(twin_opt, tmp_path / "opt.safetensors")
    assert [g["lr_scale"] for g in twin_opt.param_groups] == [0.5, 1.0]
    x = torch.randn(5, 4)
    for model, optim in ((net, opt), (twin, twin_opt)):
        model(x).pow(2).mean().backward()
        optim.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="parameter groups"):
        state_io.load_optimizer(other, tmp_path / "opt.safetensors")


def test_rng_round_trip_restores_python_numpy_and_torch(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state_io.save_rng(tmp_path / "rng.safetensors")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state_io.load_rng(tmp_path / "rng.safetensors")
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_scaler_and_model_with_shared_tensors(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state_io.save_scaler(scaler, tmp_path / "scaler.json")
    other = torch.amp.GradScaler("cpu", init_scale=2.0)
    state_io.load_scaler(other, tmp_path / "scaler.json")
    assert other.state_dict() == scaler.state_dict()
    net = torch.nn.Module()
    net.a = torch.nn.Linear(2, 2)
    net.b = net.a  # a shared module, as iBOT's shared head
    state_io.save_model(net.state_dict(), tmp_path / "m.safetensors")
    twin = torch.nn.Module()
    twin.a = torch.nn.Linear(2, 2)
    twin.b = twin.a
    state_io.load_model(twin, tmp_path / "m.safetensors")
    assert torch.equal(twin.b.weight, net.a.weight)


def test_old_pickled_checkpoints_are_refused_with_a_message(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sslpipe.weights.checkpoint_io import load_checkpoint

    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "optimizer.bin").write_bytes(b"not read")
    acc = SimpleNamespace(distributed_type=DistributedType.NO, process_index=0, unwrap_model=lambda m: m)
    with pytest.raises(ValueError, match="does not unpickle"):
        load_checkpoint(acc, tmp_path, model=torch.nn.Linear(1, 1))


def test_a_dinov3_checkpoint_with_weight_normalised_heads_says_why_it_does_not_load(tmp_path: Path) -> None:
    """A DINOv3 run written before its heads became plain Linear layers: the error says so and how to go on."""
    from safetensors.torch import save_file

    from sslpipe.models.heads import DINOHead

    old = nn.Module()
    old.dino_head = DINOHead(4, 8, hidden_dim=6, bottleneck_dim=5, nlayers=2, norm_last_layer=False)
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "model.safetensors"))
    new = nn.Module()
    new.dino_head = DINOHead(4, 8, hidden_dim=6, bottleneck_dim=5, nlayers=2, norm_last_layer=False,
                             plain_last_layer=True)
    with pytest.raises(ValueError, match=r"sslpipe wrote DINOv3 heads before they became plain Linear layers.*"
                                         r"sslpipe export RUN --with-heads"):
        state_io.load_model(new, tmp_path / "model.safetensors")
