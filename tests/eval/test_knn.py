"""Weighted kNN (faiss vs torch reference, DINO's exp(sim/T) vote), feature extraction, linear probe, benchmark."""
from __future__ import annotations

import json
import math

import faiss
import pytest
import timm
import torch
from sklearn.datasets import load_digits

from sslpipe.bench.knn import clustered_features, run_knn_bench
from sslpipe.eval import knn as knn_mod
from sslpipe.eval.knn import class_scores, knn_classify
from sslpipe.eval.linear import train_linear
from sslpipe.eval.spec import FeatureSpec, LastBlocksCLS, ProbeData
from sslpipe.models.backbones import pooled_features

torch.set_num_threads(1)


def _random(n_train=300, n_test=97, dim=16, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, dim, generator=g), torch.randint(0, classes, (n_train,), generator=g),
            torch.randn(n_test, dim, generator=g), torch.randint(0, classes, (n_test,), generator=g))


@pytest.mark.parametrize("chunk_size", [None, 1, 13, 97])
def test_faiss_matches_torch_reference(chunk_size):
    data = _random()
    ks = [1, 5, 20, 100]
    ref = knn_classify(*data, ks, 0.07, 7, 1000, backend="torch", device="cpu", return_predictions=True)
    got = knn_classify(*data, ks, 0.07, 7, chunk_size, backend="faiss", return_predictions=True)
    assert got["backend"] == "faiss" and ref["backend"] == "torch"
    for k in ks:
        assert torch.equal(got["predictions"][k], ref["predictions"][k]), k
        assert got["k"][k] == ref["k"][k]
        assert set(got["k"][k]) == {"top1", "top5"}
    # top-1 of the reference recomputed from its own predictions
    assert ref["k"][20]["top1"] == pytest.approx(float((ref["predictions"][20] == data[3]).float().mean()))


def test_exp_weighting_three_neighbours():
    """Query q=(1,0); neighbours: class 0 at sim 1.0, class 1 at sims 0.9 and 0.8, and a far class-0 point.

    T=0.07: class 0 scores e^(1/0.07)=1.6e6 > e^(0.9/0.07)+e^(0.8/0.07)=3.8e5+9.2e4 -> class 0 (a majority vote
    would say 1). T=1: e^1=2.72 < e^0.9+e^0.8=4.68 -> class 1.
    """
    sims = torch.tensor([[1.0, 0.9, 0.8]])
    labels = torch.tensor([[0, 1, 1]])
    scores = class_scores(sims, labels, 0.07, 2)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.07), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(math.exp(0.9 / 0.07) + math.exp(0.8 / 0.07), rel=1e-5)

    def angle(s):  # unit vector with cosine s to (1, 0)
        return [s, math.sqrt(1 - s * s)]

    train = torch.tensor([angle(1.0), angle(0.9), angle(0.8), [-1.0, 0.0]]) * 3.0  # scale: must be normalised away
    train_y = torch.tensor([0, 1, 1, 0])
    test, test_y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    for backend in ("faiss", "torch"):
        sharp = knn_classify(train, train_y, test, test_y, [3], 0.07, backend=backend, return_predictions=True)
        flat = knn_classify(train, train_y, test, test_y, [3], 1.0, backend=backend, return_predictions=True)
        assert sharp["predictions"][3].tolist() == [0] and sharp["k"][3] == {"top1": 1.0}  # 2 classes: no top-5
        assert flat["predictions"][3].tolist() == [1] and flat["k"][3] == {"top1": 0.0}


def test_top5_counts_a_true_class_ranked_fifth_and_not_sixth():
    """Six neighbours of six classes at falling similarity: the class of the 5th neighbour ranks 5th (a top-5 hit,
    not a top-1 one), the class of the 6th ranks 6th (no hit)."""
    sims = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    train = torch.tensor([[s, math.sqrt(1 - s * s)] for s in sims])
    train_y = torch.arange(6)
    test = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    for backend in ("faiss", "torch"):
        fifth = knn_classify(train, train_y, test, torch.tensor([4, 4, 0]), [6], 0.07, backend=backend)
        sixth = knn_classify(train, train_y, test, torch.tensor([5, 5, 5]), [6], 0.07, backend=backend)
        assert fifth["k"][6] == {"top1": pytest.approx(1 / 3), "top5": 1.0}
        assert sixth["k"][6] == {"top1": 0.0, "top5": 0.0}


def test_cpu_fallback_never_moves_index_to_gpu(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("index_cpu_to_gpu called without a GPU")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", boom, raising=False)  # faiss-cpu has no GPU functions
    result = knn_classify(*_random(), [5], backend="faiss")
    assert result["backend"] == "faiss" and 0.0 <= result["k"][5]["top1"] <= 1.0


def test_gpu_branch_taken_when_faiss_sees_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "res", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: calls.append((res, dev)) or index,
                        raising=False)
    ref = knn_classify(*_random(), [5], backend="torch", device="cpu")
    got = knn_classify(*_random(), [5], backend="faiss", max_memory_mb=1)
    assert calls == [("res", 0)] and got["k"] == ref["k"]


def test_errors_and_auto_chunk():
    data = _random(n_train=10)
    with pytest.raises(ValueError, match="k=20 exceeds the 10 training"):
        knn_classify(*data, [5, 20])
    bad = (data[0], torch.full((10,), -1), data[2], data[3])
    with pytest.raises(ValueError, match="label -1"):
        knn_classify(*bad, [5])
    for T in (0.0, -0.07):
        with pytest.raises(ValueError, match=rf"kNN temperature must be > 0 \(DINO: 0.07\), got {T}"):
            knn_classify(*data, [5], T=T)
    # 1 MiB budget for the torch backend: (chunk x n_train) floats must fit
    chunk = knn_mod.auto_chunk_size(10_000, 64, 20, 10, backend="torch", device=torch.device("cpu"), max_memory_mb=1)
    assert chunk * 10_000 * 4 <= 2**20 and chunk > 0


def test_knn_on_digits_pixels():
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    result = knn_classify(x[:1200], y[:1200], x[1200:], y[1200:], [10, 20], 0.07)
    assert result["k"][10]["top1"] > 0.95 and result["k"][20]["top1"] > 0.95
    assert result["n_train"] == 1200 and result["n_test"] == len(x) - 1200


def test_linear_probe_on_separable_features(device):
    train_x, train_y = clustered_features(600, 32, 5, seed=0, spread=6.0)
    val_x, val_y = clustered_features(200, 32, 5, seed=1, spread=6.0)
    result = train_linear(train_x, train_y, val_x, val_y, epochs=30, batch_size=32, device=device)
    assert result["top1"] > 0.9 and result["lr"] == pytest.approx(0.001 * 32 / 256)
    chance = train_linear(train_x, train_y, val_x, val_y[torch.randperm(200)], epochs=1, batch_size=32, device=device)
    assert chance["top1"] < 0.5  # shuffled labels: the check can fail


def test_feature_definitions():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2,
                            dynamic_img_size=True).eval()
    cnn = timm.create_model("resnet18", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = vit.forward_features(x)[:, 0]  # CLS after the final norm
        assert torch.equal(pooled_features(vit, x), cls) and torch.equal(vit(x), cls)
        assert torch.equal(pooled_features(cnn, x), cnn(x)) and cnn(x).shape == (2, 512)
        headed = timm.create_model("resnet18", num_classes=10).eval()  # a classifier: its pre-logits feature
        headed.load_state_dict(cnn.state_dict(), strict=False)
        assert torch.equal(pooled_features(headed, x), cnn(x))
        # last 2 blocks' CLS, each through the final norm (DINO get_intermediate_layers)
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        block0 = vit.blocks[0](tokens)
        expected = torch.cat([vit.norm(block0)[:, 0], cls], dim=1)
        assert torch.allclose(LastBlocksCLS(2)(vit, x), expected, atol=1e-5)
        # a CNN has no per-block CLS: refused (it fell back to its pooled features, leaving n unread)
        with pytest.raises(ValueError, match=r"--n-last-blocks .* read only for ViTs: this ResNet backbone"):
            LastBlocksCLS(4)(cnn, x)


def test_last_blocks_cls_of_an_eva_vit_dinov3_concatenates_its_blocks():
    """timm's Eva (every DINOv3 export) has a CLS token but no `has_class_token` flag: the `blocks` pooling is still
    the last blocks' CLS, each through the final norm (read here from hooks on the blocks), not the pooled feature."""
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=32, depth=3,
                            embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in vit.blocks[-2:]]
    with torch.no_grad():
        final = vit.forward_features(x)[:, 0]
        for h in hooks:
            h.remove()
        expected = torch.cat([vit.norm(o)[:, 0] for o in outs], dim=1)
        got = LastBlocksCLS(2)(vit, x)
    assert got.shape == (2, 64) and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got[:, 32:], final, atol=1e-5)
    with pytest.raises(ValueError, match="has 3 blocks: pass --n-last-blocks 3 or fewer"):
        LastBlocksCLS(4)(vit, x)


def test_bench_returns_three_timings():
    result = run_knn_bench(n_train=500, n_test=100, dim=16, k=10, num_classes=4)
    for key in ("faiss_s", "torch_s", "sklearn_s", "faiss_vs_torch", "faiss_vs_sklearn"):
        assert result[key] > 0
    assert result["agree_faiss_torch"] == 1.0
    assert result["agree_faiss_sklearn"] > 0.98


def test_torch_backend_on_each_device_equals_faiss(device):
    data = _random()
    ref = knn_classify(*data, [1, 20], 0.07, 7, backend="faiss", return_predictions=True)
    got = knn_classify(*data, [1, 20], 0.07, 7, backend="torch", device=device, return_predictions=True)
    for k in (1, 20):
        assert torch.equal(got["predictions"][k], ref["predictions"][k]) and got["k"][k] == ref["k"][k]


def test_without_faiss_the_torch_backend_answers_with_a_notice(monkeypatch, capsys, tmp_path):
    """Installed without the cpu/gpu extra: one line on stderr, the same result, never a traceback."""
    data = _random()
    ref = knn_classify(*data, [5], backend="faiss", return_predictions=True)
    monkeypatch.setattr(knn_mod, "faiss", None)
    got = knn_classify(*data, [5], backend="faiss", return_predictions=True)
    assert got["backend"] == "torch" and torch.equal(got["predictions"][5], ref["predictions"][5])
    err = capsys.readouterr().err
    assert "faiss is not installed" in err and "sslpipe[cpu]" in err and len(err.strip().splitlines()) == 1
    from sslpipe.cli import main
    assert main(["bench", "knn", "--n-train", "50", "--n-test", "10", "--dim", "4"]) == 2
    assert "pip install 'sslpipe[cpu]'" in capsys.readouterr().err


def test_feature_spec_reads_the_export_and_keys_the_cache(tmp_path):
    """A spec built from an export takes its image size, mean and std (flags override them); the cache fingerprint
    follows every field that changes the features and none that only changes how they are computed."""
    from dataclasses import replace

    from PIL import Image

    from sslpipe.eval.features import fingerprint
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards
    from sslpipe.weights.export import export_backbone

    args = {"img_size": 28, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **args).eval()
    out = export_backbone(vit, tmp_path / "exp", arch="vit_tiny_patch16_224", model_args=args, img_size=28,
                          mean=(0.4,) * 3, std=(0.2,) * 3, source={})
    spec = FeatureSpec.from_export(out, resize=None, crop=None, batch_size=16)
    assert (spec.img_size, spec.input_size, spec.short_side, spec.batch_size) == (28, 28, 32, 16)
    assert spec.mean == (0.4,) * 3 and spec.std == (0.2,) * 3
    assert FeatureSpec.from_export(out, crop=24).input_size == 24
    assert spec.transform()(Image.new("RGB", (50, 40))).shape == (3, 28, 28)

    shards = tmp_path / "shards"
    write_shards(shards, source="digits", options=ShardOptions(limit=10, samples_per_shard=10), progress=False)

    def key(s: FeatureSpec) -> str:
        return fingerprint(vit, str(shards), "train", s, None)

    assert key(replace(spec, batch_size=7, num_workers=2, device="cpu")) == key(spec)
    changed = [replace(spec, resize=40), replace(spec, crop=24), replace(spec, mean=(0.5,) * 3),
               replace(spec, pooling="blocks"), replace(spec, pooling="blocks", layers=2),
               replace(spec, precision="autocast")]
    assert len({key(s) for s in [spec, *changed]}) == 1 + len(changed)


def test_extract_features_and_run_knn_on_shards(tmp_path, monkeypatch, device):
    from dataclasses import replace

    from sslpipe.eval import features as feat_mod
    from sslpipe.eval.knn import run_knn
    from sslpipe.ingest.datasets import iter_dataset
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards
    from sslpipe.weights.export import export_backbone

    shards = tmp_path / "shards"
    write_shards(shards, source="digits", options=ShardOptions(limit=40, samples_per_shard=15), progress=False)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2,
                            dynamic_img_size=True).eval().to(device)
    spec = FeatureSpec(img_size=32, resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=16)
    transform = spec.transform()
    cache = tmp_path / "cache" / "f.safetensors"
    feats, labels = feat_mod.extract_features(vit, str(shards), spec, split="train", max_samples=35,
                                              cache_path=cache, progress=False)
    assert next(vit.parameters()).device.type == device, "extraction must leave the model where it was"
    images = list(iter_dataset("digits", "train", limit=35))
    assert labels.tolist() == [label for _, label in images]
    with torch.no_grad():
        expected = vit(torch.stack([transform(img.convert("RGB")) for img, _ in images]).to(device)).cpu()
    assert feats.dtype == torch.float32 and torch.allclose(feats, expected, atol=1e-5)
    on_cpu, _ = feat_mod.extract_features(vit, str(shards), replace(spec, device="cpu"), split="train",
                                          max_samples=35, progress=False)
    assert next(vit.parameters()).device.type == device
    torch.testing.assert_close(on_cpu, feats, atol=1e-4, rtol=1e-4)  # fp32 on either device

    # a matching cache is reused without reading shards; a changed model is not
    monkeypatch.setattr(feat_mod, "build_loader", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    again, _ = feat_mod.extract_features(vit, str(shards), replace(spec, batch_size=7), split="train",
                                         max_samples=35, cache_path=cache, progress=False)
    assert torch.equal(again, feats)
    with torch.no_grad():
        vit.cls_token.add_(1.0)
    with pytest.raises(AssertionError, match="read"):
        feat_mod.extract_features(vit, str(shards), spec, split="train", max_samples=35, cache_path=cache,
                                  progress=False)
    monkeypatch.undo()

    out = export_backbone(vit, tmp_path / "exp", arch="vit_tiny_patch16_224",
                          model_args={"img_size": 32, "patch_size": 4, "depth": 2, "dynamic_img_size": True},
                          img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, source={})
    # val = the train split itself: each sample is its own nearest neighbour
    data = ProbeData(str(shards), str(shards), val_split="train")
    result = run_knn(out, FeatureSpec.from_export(out, resize=32, batch_size=16, device=device), data,
                     k_list=[1, 5], progress=False, out_json=tmp_path / "knn.json")
    assert result["n_train"] == 40 and result["n_test"] == 40 and result["backbone"] == str(out)
    assert result["k"][1]["top1"] == 1.0
    assert json.loads((tmp_path / "knn.json").read_text())["k"]["5"] == result["k"][5]
    on_cpu = run_knn(out, FeatureSpec.from_export(out, resize=32, batch_size=16, device="cpu"), data,
                     k_list=[1, 5], progress=False)
    assert on_cpu["k"] == result["k"]
