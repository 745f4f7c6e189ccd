"""`sslpipe show` (sslpipe/viz): attention maps equal a direct computation, the patch PCA shows a structure built into
the features, neighbours are the cosine top-k, and the command writes its four PNGs (and hands them to a tracker)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import one_line_error
from PIL import Image

from sslpipe.cli import main
from sslpipe.data.manifest import read_manifest
from sslpipe.eval.features import prepare_backbone
from sslpipe.eval.spec import FeatureSpec, ProbeData
from sslpipe.models.backbones import has_class_token
from sslpipe.recipes import load_config
from sslpipe.viz import attention as attention_module
from sslpipe.viz import neighbours as neighbours_module
from sslpipe.viz import show as show_module
from sslpipe.viz.attention import (
    cls_attention,
    draw_attention,
    feature_norm,
    has_attention,
    mass_mask,
    received_attention,
)
from sslpipe.viz.neighbours import nearest
from sslpipe.viz.pca import patch_features, pca_rgb
from sslpipe.viz.show import show
from sslpipe.weights.export import export_backbone

DIM, HEADS, PATCH, SIZE = 24, 3, 4, 16


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def tiny_vit(reg_tokens: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE,
                             patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=HEADS, reg_tokens=reg_tokens,
                             dynamic_img_size=True).eval()


def direct_cls_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's [CLS] attention written out from the weights, independently of sslpipe's code."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    block = model.blocks[-1]
    y = block.norm1(tokens)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    hd = DIM // HEADS
    maps = []
    for head in range(HEADS):
        rows = slice(head * hd, (head + 1) * hd)
        q = y @ w[:DIM][rows].T + b[:DIM][rows]
        k = y @ w[DIM:2 * DIM][rows].T + b[DIM:2 * DIM][rows]
        scores = torch.einsum("bd,bnd->bn", q[:, 0], k) / math.sqrt(hd)
        maps.append(torch.softmax(scores, dim=-1))
    return torch.stack(maps, 1)  # (B, heads, tokens): the [CLS] row


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_cls_attention_equals_a_direct_computation_and_timms_unfused_path(reg_tokens: int) -> None:
    model = tiny_vit(reg_tokens)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    got = cls_attention(model, x)
    grid = SIZE // PATCH
    assert got.shape == (2, HEADS, grid, grid)
    prefix = 1 + reg_tokens
    direct = direct_cls_attention(model, x)
    torch.testing.assert_close(got, direct[:, :, prefix:].reshape(2, HEADS, grid, grid), rtol=1e-5, atol=1e-6)

    caught = []  # timm's own math path: the softmax attention passes through attn_drop
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: caught.append(out))
    with torch.no_grad():
        model(x)
    hook.remove()
    torch.testing.assert_close(got, caught[0][:, :, 0, prefix:].reshape(2, HEADS, grid, grid), rtol=1e-5, atol=1e-6)


def test_cls_attention_of_a_rope_vit_applies_the_rotation() -> None:
    """DINOv3's RoPE ViT (timm's vit_small_patch16_dinov3, 4 storage tokens, q and v biases): the map equals the
    softmax of rotated q and k written out here (DINOv3's rotate-half form on the patch tokens only), and differs
    from the map without the rotation."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, img_size=SIZE,
                              patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=HEADS).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    got = cls_attention(model, x)
    with torch.no_grad():
        tokens, rope = model._pos_embed(model.patch_embed(x))
        tokens = model.blocks[0](model.norm_pre(tokens), rope=rope)
        block = model.blocks[-1]
        y = block.norm1(tokens)
        bias = torch.cat([block.attn.q_bias, torch.zeros_like(block.attn.q_bias), block.attn.v_bias])
        q, k, _ = (y @ block.attn.qkv.weight.T + bias).reshape(2, -1, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        sin, cos = rope.chunk(2, dim=-1)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            first, second = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-second, first], dim=-1) * sin

        prefix = model.num_prefix_tokens
        assert prefix == 5  # [CLS] + 4 storage tokens
        q_rot, k_rot = (torch.cat([t[:, :, :prefix], rotate(t[:, :, prefix:])], dim=2) for t in (q, k))
        grid = SIZE // PATCH
        for qq, kk, same in ((q_rot, k_rot, True), (q, k, False)):
            direct = ((qq[:, :, :1] @ kk.transpose(-2, -1)) / math.sqrt(DIM // HEADS)).softmax(-1)
            direct = direct[:, :, 0, prefix:].reshape(2, HEADS, grid, grid)
            assert torch.allclose(got, direct, rtol=1e-5, atol=1e-6) == same
    assert model.blocks[-1].attn.fused_attn == timm.layers.use_fused_attn()  # restored


def test_attention_of_a_hand_set_block_is_uniform() -> None:
    """q = 0 (hand-set weights) makes every score 0: the [CLS] attends 1/N to each of the N tokens."""
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[:DIM] = 0
        model.blocks[-1].attn.qkv.bias[:DIM] = 0
    got = cls_attention(model, torch.randn(1, 3, SIZE, SIZE))
    n_tokens = 1 + (SIZE // PATCH) ** 2
    torch.testing.assert_close(got, torch.full_like(got, 1 / n_tokens))


def _captions(monkeypatch: pytest.MonkeyPatch, module) -> list[str]:
    """The captions `module` hands to save_rows (the figure's text cannot be read back from the PNG)."""
    captions: list[str] = []
    real = module.save_rows
    monkeypatch.setattr(module, "save_rows", lambda *a, **kw: captions.append(kw["caption"]) or real(*a, **kw))
    return captions


def test_a_vit_without_a_class_token_gets_the_attention_each_patch_receives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `sslpipe import` builds for a checkpoint without cls_token (class_token=False, global_pool="avg"): row
    0 of its attention is the top-left patch's query, so no [CLS] map exists. Drawn: each patch's attention received,
    averaged over the 16 patch queries (timm's unfused matrix, hooked here), captioned as such."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE,
                              patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=HEADS, class_token=False,
                              global_pool="avg").eval()
    assert model.num_prefix_tokens == 0 and not has_class_token(model) and has_class_token(tiny_vit())
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    caught = []
    attn = model.blocks[-1].attn
    fused, attn.fused_attn = attn.fused_attn, False
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: caught.append(out))
    with torch.no_grad():
        model(x)
    hook.remove()
    attn.fused_attn = fused
    grid = SIZE // PATCH
    expected = caught[0].mean(dim=2).reshape(2, HEADS, grid, grid)  # column means: attention received
    got = received_attention(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=(-2, -1)), torch.ones(2, HEADS))  # each row of softmax sums to 1
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        cls_attention(model, x)
    captions = _captions(monkeypatch, attention_module)
    images = [torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)] * 2
    draw_attention(model, x, images, tmp_path / "a.png")
    draw_attention(tiny_vit(), x, images, tmp_path / "b.png")
    assert "[CLS] self-attention" not in captions[0] and "has no [CLS] token" in captions[0]
    assert "averaged over all patch queries" in captions[0]
    assert captions[1].startswith("[CLS] self-attention of the last block")


def test_mass_mask_keeps_the_patches_holding_the_mass() -> None:
    maps = torch.tensor([[0.5, 0.1], [0.3, 0.1]])  # sorted mass 0.5, 0.3 (=0.8 >= 0.6), then 0.1, 0.1
    assert mass_mask(maps, 0.6).tolist() == [[True, False], [True, False]]
    assert mass_mask(maps, 0.5).tolist() == [[True, False], [False, False]]
    assert mass_mask(maps * 7, 0.6).tolist() == [[True, False], [True, False]]  # scale-free


def test_cnn_gets_the_feature_norm_map(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    assert not has_attention(cnn)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = cnn.forward_features(x)
    torch.testing.assert_close(feature_norm(cnn, x), fmap.norm(dim=1, keepdim=True))
    images = [torch.zeros(3, 64, 64, dtype=torch.uint8)] * 2
    png = np.asarray(Image.open(draw_attention(cnn, x, images, tmp_path / "a.png")))
    assert png.shape[1] == 2 * 192 + 2  # image | feature norm


def structured_features() -> torch.Tensor:
    """Two 6x6 grids of 16-d features: background everywhere (one small vector + noise); image 0 holds an object at
    rows and columns 1-4 made of four parts (its quadrants A, B, C, D: one direction in common, each its own offset);
    image 1 holds part A alone at rows and columns 2-3."""
    g = torch.Generator().manual_seed(0)
    d = 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    background = 0.2 * basis[0]
    parts = [3 * basis[1] + 2 * offset for offset in (basis[2], -basis[2], basis[3], basis[4])]
    feats = background + 0.01 * torch.randn(2, 6, 6, d, generator=g)
    for (rows, cols), part in zip(QUADRANTS, parts):
        feats[0, rows, cols] += part - background
    feats[1, 2:4, 2:4] += parts[0] - background
    return feats


QUADRANTS = [(slice(1, 3), slice(1, 3)), (slice(1, 3), slice(3, 5)), (slice(3, 5), slice(1, 3)),
             (slice(3, 5), slice(3, 5))]


def test_pca_image_shows_the_structure_built_into_the_features() -> None:
    feats = structured_features()
    first, foreground, rgb = pca_rgb(feats)
    expected = torch.zeros(2, 6, 6, dtype=torch.bool)
    expected[0, 1:5, 1:5] = True
    expected[1, 2:4, 2:4] = True
    assert torch.equal(foreground, expected)  # the first component separates the objects from the background
    assert (first[expected] > 0).all() and (first[~expected] < 0).all()
    assert (rgb[~expected] == 0).all()  # background black
    colours = [rgb[0, rows, cols].reshape(-1, 3) for rows, cols in QUADRANTS]
    for part in colours:
        assert part.std(dim=0).max() < 0.02  # one colour per part
    means = torch.stack([c.mean(0) for c in colours])
    assert torch.cdist(means, means).add(torch.eye(4)).min() > 0.3  # four parts, four distinct colours
    again = rgb[1, 2:4, 2:4].reshape(-1, 3).mean(0)
    assert (again - means[0]).abs().max() < 0.02  # part A has the same colour in both images (one PCA for all)
    assert torch.equal(pca_rgb(-feats)[1], expected)  # the sign of a component is arbitrary: the border decides


def test_patch_features_of_a_vit_drop_the_prefix_tokens() -> None:
    model = tiny_vit(reg_tokens=2)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = model.forward_features(x)
    feats = patch_features(model, x)
    assert feats.shape == (1, SIZE // PATCH, SIZE // PATCH, DIM)
    torch.testing.assert_close(feats[0, 1, 2], tokens[0, 3 + 1 * (SIZE // PATCH) + 2])


def test_nearest_is_the_cosine_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(50, 8, generator=g), torch.randn(3, 8, generator=g)
    sims, idx = nearest(train * torch.rand(50, 1, generator=g) * 5, queries, 4)  # lengths do not matter
    cos = F.cosine_similarity(queries[:, None], train[None], dim=-1)
    assert torch.equal(idx, cos.argsort(dim=1, descending=True)[:, :4])
    torch.testing.assert_close(sims, cos.gather(1, idx))
    with pytest.raises(ValueError, match="exceeds"):
        nearest(train, queries, 51)


class FakeTracker:
    def __init__(self) -> None:
        self.logged: dict = {}

    def log_images(self, values: dict) -> None:
        self.logged.update(values)


def export_tiny_vit(out: Path) -> Path:
    args = dict(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=HEADS, dynamic_img_size=True)
    return export_backbone(tiny_vit(), out, arch="vit_tiny_patch16_224", model_args=args, img_size=SIZE,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), source={"test": True})


def test_show_writes_four_pngs_and_logs_them(digits_shards: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """... and the neighbours' caption says they were searched among the first --max-train (120) train images,
    not all 1438 that `sslpipe knn` votes with."""
    export = export_tiny_vit(tmp_path / "export")
    tracker = FakeTracker()
    captions = _captions(monkeypatch, neighbours_module)
    data = ProbeData(str(digits_shards), str(digits_shards), max_train=120, max_val=60)
    paths = show(export, tmp_path / "show", FeatureSpec.from_export(export), data=data, n=2, k=3, tracker=tracker,
                 progress=False)
    assert set(paths) == {"attention", "pca", "neighbours", "embedding"}
    sizes = {name: Image.open(p).size for name, p in paths.items()}
    panel = 192 + 2
    assert sizes["attention"][0] == (1 + HEADS + 1) * panel - 2  # image, every head, their mean
    assert sizes["pca"][0] == 4 * panel - 2 and sizes["neighbours"][0] == (1 + 3) * panel - 2
    assert sizes["attention"][1] > 4 * 192 and sizes["embedding"][0] > 400  # two rows per image; a real plot
    assert set(tracker.logged) == {f"show/{name}" for name in paths}
    assert captions == ["Each query (left) and its 3 nearest among the first 120 train images by cosine similarity "
                        "of the kNN probe's features (label and similarity under each)."]


def test_neighbours_drawn_are_the_images_found_with_loader_workers(digits_shards: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec with 2 loader workers (as `sslpipe knn --workers 2` builds it; batches of 16 from 12 train shards
    interleave, so the workers' order is not the stream order): each drawn neighbour is the image whose feature was
    found -- its own feature has the similarity written under it, and its label is its caption."""
    export = export_tiny_vit(tmp_path / "export")
    spec = FeatureSpec.from_export(export, num_workers=2, batch_size=16)
    fetched, found, drawn = {}, {}, {}
    real_read, real_nearest, real_draw = show_module.read_samples, show_module.nearest, show_module.draw_neighbours

    def nearest(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        found["queries"], (found["sims"], found["idx"]) = queries, real_nearest(train, queries, k)
        return found["sims"], found["idx"]

    monkeypatch.setattr(show_module, "read_samples", lambda shards, split, indices: fetched.setdefault(
        split, real_read(shards, split, indices)))
    monkeypatch.setattr(show_module, "nearest", nearest)
    monkeypatch.setattr(show_module, "draw_neighbours", lambda *a, **kw: drawn.update(names=a[3]) or real_draw(
        *a, **kw))
    data = ProbeData(str(digits_shards), str(digits_shards), max_train=96, max_val=40)
    show(export, tmp_path / "show", spec, data=data, n=3, k=4, progress=False)

    queries, sims, idx = found["queries"], found["sims"], found["idx"]
    classes = read_manifest(str(digits_shards))["classes"]
    model, _ = prepare_backbone(export, spec)
    transform = spec.transform()
    for row in range(3):
        images = torch.stack([transform(fetched["train"][i][0]) for i in idx[row].tolist()])
        with torch.no_grad():
            own = spec.feature_fn()(model, images).float()
        torch.testing.assert_close(F.cosine_similarity(own, queries[row][None], dim=-1), sims[row], rtol=0,
                                   atol=1e-5)
        assert [classes[fetched["train"][i][1]] for i in idx[row].tolist()] == drawn["names"][row]


def test_show_command_on_image_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = export_tiny_vit(tmp_path / "export")
    files = []
    for i in range(2):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(files[-1])
    assert main(["show", str(export), "--images", *map(str, files), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["attention.png", "pca.png"]
    assert "need --data" in capsys.readouterr().out
    assert main(["show", str(export), "--out", str(tmp_path / "none")]) == 2  # no images at all: a clear error
    assert "--data SHARDS" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    err = one_line_error(["show", str(export), "--images", str(files[0]), str(broken), "--out",
                          str(tmp_path / "bad")], capsys)
    assert f"image {broken} cannot be read" in err


def test_readme_probes_the_demo_export_at_the_demos_size() -> None:
    """Every README command on the demo's export that sets --resize / --crop (knn, qscore, embed, show) uses the
    size the demo trains its default recipe at and probes with (`demo.py`: --resize and --crop = crops.global_size),
    so `show` pictures what the probe measures and `knn` repeats the demo's number."""
    from sslpipe.demo import DEFAULT_RECIPE

    size = load_config(DEFAULT_RECIPE).crops.global_size
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "runs/demo/pretrain/export/teacher " in line
             and re.search(r"--(resize|crop) ", line)]
    assert len(lines) == 4  # knn, qscore, embed, show
    for line in lines:
        assert re.findall(r"--(?:resize|crop) (\d+)", line) == [str(size)] * 2, line
