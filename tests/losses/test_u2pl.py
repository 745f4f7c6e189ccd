"""U2PL: the entropy filter and its schedule, the rank rule of negatives, FIFO queues (and their checkpoint), CutMix
alignment, the contrastive loss against a hand computation, the EMA decay and the teacher update of the official code,
the official crop padding and scale draw, the pseudo-label diagnostics, mIoU against a reference, sliding-window
inference, seeded label splits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sslpipe.data.cutmix import apply_cutmix, cutmix_box, cutmix_masks
from sslpipe.data.u2pl_views import U2PLSegTransform, draw_scale
from sslpipe.eval.seg_eval import slide_logits, whole_logits
from sslpipe.eval.segmentation import SegmentationMetric
from sslpipe.ingest.semi_shards import label_split, parse_labeled
from sslpipe.losses.u2pl_contrastive import (
    U2PLContrastiveLoss,
    class_ranks,
    entropy_split,
    info_nce,
    low_entropy_percent,
    negative_masks,
)
from sslpipe.losses.u2pl_unsup import drop_percent_at, entropy_map, percentile, reliable_mask, unsupervised_loss
from sslpipe.models.ema import build_teacher
from sslpipe.models.memory_queue import ClassQueues
from sslpipe.recipes.u2pl import ema_decay_at, pseudo_label_metrics, update_teacher


def _probs_with_entropies(n: int, classes: int = 4) -> torch.Tensor:
    """(1, C, 1, n) probability map whose pixel j has strictly increasing entropy with j (more mass spread out)."""
    cols = []
    for j in range(n):
        top = 0.97 - 0.07 * j
        cols.append(torch.tensor([top] + [(1 - top) / (classes - 1)] * (classes - 1)))
    return torch.stack(cols, dim=1).view(1, classes, 1, n)


# ---------------------------------------------------------------------------------------------- entropy filter
def test_percentile_equals_numpy() -> None:
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0, 7.5, 20, 50, 80, 93.3, 100):
        assert float(percentile(x, q)) == pytest.approx(float(np.percentile(x.numpy(), q)), abs=1e-6)


def test_entropy_filter_keeps_exactly_the_expected_pixels_and_follows_the_schedule() -> None:
    prob = _probs_with_entropies(10)
    h = entropy_map(prob)[:, 0]  # (1, 10), increasing
    assert torch.all(h[0, 1:] > h[0, :-1])
    ref = -(prob * torch.log(prob + 1e-10)).sum(1)[:, 0]
    torch.testing.assert_close(h, ref)
    valid = torch.ones_like(h, dtype=torch.bool)
    # schedule: 80 at epoch 0, 90 half way, 100 at the end (drop_percent 80)
    assert drop_percent_at(0, 10, 80) == 80 and drop_percent_at(5, 10, 80) == 90 and drop_percent_at(10, 10, 80) == 100
    # 10 sorted values: the 80th percentile lies between the 8th and 9th (pos 7.2) -> the 8 lowest are kept
    assert reliable_mask(h, valid, drop_percent_at(0, 10, 80))[0].tolist() == [True] * 8 + [False] * 2
    # epoch 5: 90th percentile at pos 8.1 -> 9 kept
    assert reliable_mask(h, valid, drop_percent_at(5, 10, 80))[0].tolist() == [True] * 9 + [False]
    # invalid (padding) pixels are never kept and do not enter the percentile: drop the 2 lowest ones
    valid2 = valid.clone()
    valid2[0, :2] = False
    kept = reliable_mask(h, valid2, 80.0)[0].tolist()  # 8 valid values, pos 5.6 -> the 6 lowest valid kept
    assert kept == [False, False] + [True] * 6 + [False] * 2


def test_unsupervised_loss_is_the_paper_normalisation() -> None:
    prob = _probs_with_entropies(10)
    h = entropy_map(prob)  # (1, 1, 10)
    logits = torch.randn(1, 4, 1, 10, generator=torch.Generator().manual_seed(1))
    pseudo = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 255]).view(1, 1, 10)  # last pixel: padding
    loss, reliable = unsupervised_loss(logits, pseudo, h, 80.0)
    # 9 valid pixels: 80th percentile at pos 6.4 -> the 7 lowest kept; loss = their CE summed / 9 valid pixels
    assert reliable[0, 0].tolist() == [True] * 7 + [False] * 3
    ce = -torch.log_softmax(logits, 1)[0, pseudo[0, 0, :7], 0, torch.arange(7)]
    assert float(loss) == pytest.approx(float(ce.sum() / 9), rel=1e-6)


# ----------------------------------------------------------------------------------------------- rank rule
def test_negatives_follow_the_rank_rule() -> None:
    C, c = 30, 7
    g = torch.Generator().manual_seed(0)
    # 4 pixels on an unlabelled image: class c at rank 2, 5, 25, 5 (the last one low-entropy, not "high")
    logits = torch.randn(1, C, 1, 4, generator=g)
    for j, rank in enumerate((2, 5, 25, 5)):
        others = [k for k in range(C) if k != c]
        values = torch.linspace(10, 0, C)
        order = others[:rank] + [c] + others[rank:]
        logits[0, order, 0, j] = values
    prob = logits.softmax(1)
    ranks = class_ranks(prob)
    assert ranks[0, c, 0].tolist() == [2, 5, 25, 5]
    labels = torch.full((1, 1, 4), 255)
    high = torch.tensor([[[True, True, True, False]]])
    neg = negative_masks(ranks, labels, torch.tensor([False]), high, low_rank=3, high_rank=20)
    assert neg[0, c, 0].tolist() == [False, True, False, False]
    # every class of the pixel at rank 5 with rank in [3, 20) is a negative of that pixel, no other
    assert neg[0, :, 0, 1].sum() == 17


def test_labelled_negatives_are_top_ranks_of_other_classes() -> None:
    # labelled pixels: class c is a negative iff ground truth != c and c ranks in the top 3 (paper, not the code)
    prob = torch.tensor([0.5, 0.3, 0.15, 0.05]).view(1, 4, 1, 1).repeat(1, 1, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    neg = negative_masks(class_ranks(prob), labels, torch.tensor([True]), torch.zeros(1, 1, 3, dtype=torch.bool))
    assert neg[0, :, 0, 0].tolist() == [False, True, True, False]  # GT 0: classes 1, 2 (ranks 1, 2)
    assert neg[0, :, 0, 1].tolist() == [True, False, True, False]  # GT 1: classes 0, 2
    assert not neg[0, :, 0, 2].any()  # ignore label


def test_entropy_split_and_alpha_schedule() -> None:
    h = torch.arange(10.0).view(1, 1, 10)
    low, high = entropy_split(h, torch.ones_like(h, dtype=torch.bool), 20.0)
    # 20th percentile at pos 1.8 (value 1.8), 80th at 7.2
    assert low[0, 0].tolist() == [True, True] + [False] * 8
    assert high[0, 0].tolist() == [False] * 8 + [True, True]
    assert low_entropy_percent(0, 80) == 20 and low_entropy_percent(40, 80) == 10


# ------------------------------------------------------------------------------------------------- queues
def test_queues_are_fifo_with_capacity() -> None:
    q = ClassQueues(2, 2, [5, 3])
    rows = lambda a, b: torch.arange(a, b).float()[:, None].repeat(1, 2)  # noqa: E731
    q.push([rows(0, 3), rows(100, 102)])
    q.push([rows(3, 7), rows(102, 103)])
    assert q.sizes() == [5, 3]
    assert q.queue(0)[:, 0].tolist() == [2, 3, 4, 5, 6]  # the oldest two (0, 1) left first
    assert q.queue(1)[:, 0].tolist() == [100, 101, 102]
    q.push([rows(7, 8), rows(103, 110)])  # more than the capacity at once: the newest 3
    assert q.queue(0)[:, 0].tolist() == [3, 4, 5, 6, 7]
    assert q.queue(1)[:, 0].tolist() == [107, 108, 109]
    assert torch.isin(q.sample(0, 100), q.queue(0)).all()


def test_queues_survive_a_safetensors_checkpoint(tmp_path) -> None:
    q = ClassQueues(3, 4, [6, 4, 4])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        q.push([torch.randn(3, 4, generator=g), torch.randn(1, 4, generator=g), torch.zeros(0, 4)])
    save_file(q.state(), str(tmp_path / "extra.safetensors"))
    back = ClassQueues(3, 4, [6, 4, 4])
    back.load_state(load_file(str(tmp_path / "extra.safetensors")))
    assert back.sizes() == q.sizes() == [6, 4, 0]
    for c in range(2):
        torch.testing.assert_close(back.queue(c), q.queue(c))
        s1 = q.sample(c, 9, torch.Generator().manual_seed(3))
        s2 = back.sample(c, 9, torch.Generator().manual_seed(3))
        torch.testing.assert_close(s1, s2)  # the same draws: logical order is kept across the restore
    new = torch.randn(2, 4, generator=g)
    q.push([new, new[:0], new[:0]])
    back.push([new, new[:0], new[:0]])
    torch.testing.assert_close(back.queue(0), q.queue(0))


# ------------------------------------------------------------------------------------------------- cutmix
def test_cutmix_moves_image_label_and_confidence_together() -> None:
    torch.manual_seed(0)
    B, H, W = 4, 12, 10
    ids = torch.arange(B).view(B, 1, 1).expand(B, H, W)
    images = ids[:, None].float().repeat(1, 3, 1, 1) * 10 + torch.rand(B, 3, H, W)  # image i in [10i, 10i + 1)
    label, conf = ids.clone(), ids.float() / 10
    keep = cutmix_masks(B, H, W)
    img2, lab2, conf2 = apply_cutmix(keep, images, label, conf)
    src = (img2[:, 0] // 10).long()
    assert torch.equal(src, lab2) and torch.allclose(conf2 * 10, lab2.float())
    for i in range(B):
        inside = ~keep[i]
        assert (lab2[i][inside] == (i + 1) % B).all() and (lab2[i][~inside] == i).all()
        ys, xs = inside.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert int(box) == int(inside.sum())  # one rectangle
        assert abs(int(inside.sum()) - H * W / 2) <= W  # of half the area (rounded height)
        assert torch.equal(img2[i][:, ~inside], images[i][:, ~inside])
        assert torch.equal(img2[i][:, inside], images[(i + 1) % B][:, inside])


def test_cutmix_box_stays_inside() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        y0, y1, x0, x1 = cutmix_box(33, 17, g)
        assert 0 <= y0 < y1 <= 33 and 0 <= x0 < x1 <= 17 and 17 // 2 + 1 <= x1 - x0 <= 16


# ------------------------------------------------------------------------------------------- contrastive loss
def test_info_nce_equals_hand_computation() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([1.0, 1.0])
    negs = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -3.0]]])
    # anchor 1: cos pos 1/sqrt2, negs 0, -1; anchor 2: cos pos 1/sqrt2, negs 0, -1
    t = 0.5
    one = -math.log(math.exp(2 ** -0.5 / t) / (math.exp(2 ** -0.5 / t) + math.exp(0) + math.exp(-1 / t)))
    assert float(info_nce(a, pos, negs, t)) == pytest.approx(one, rel=1e-6)


def test_contrastive_loss_on_a_tiny_case_equals_hand_computation() -> None:
    """Image 0 labelled (GT 0), image 1 unlabelled (pseudo-label 1), one pixel each, 2 classes, ranks [1, 2).
    Class 0: anchor = student pixel 0, positive = teacher pixel 0, the only negative = teacher pixel 1 (unreliable,
    class 0 at rank 1). Class 1 has an anchor but no negative (its queue stays empty): no term."""
    rep = torch.tensor([[1.0, 0.0], [0.3, 0.9]]).view(2, 2, 1, 1).requires_grad_(True)
    rep_t = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    prob = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).view(2, 2, 1, 1)
    labels = torch.tensor([0, 1]).view(2, 1, 1)
    labelled = torch.tensor([True, False])
    low = high = torch.ones(2, 1, 1, dtype=torch.bool)
    queues = ClassQueues(2, 2, 10)
    loss_fn = U2PLContrastiveLoss(2, current_class_threshold=0.3, low_rank=1, high_rank=2, num_queries=3,
                                  num_negatives=2, temperature=0.5)
    loss, metrics = loss_fn(rep, rep_t, prob, labels, labelled, low, high, queues)
    assert queues.sizes() == [1, 0]
    torch.testing.assert_close(queues.queue(0), torch.tensor([[0.0, 1.0]]))
    expected = math.log(1 + 2 * math.exp(-(2 ** -0.5) / 0.5))  # -log(e^{c+/t} / (e^{c+/t} + 2 e^{0}))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert metrics["contrastive/classes"] == 1 and metrics["contrastive/anchor_classes"] == 2
    loss.backward()
    assert rep.grad[0].abs().sum() > 0 and rep.grad[1].abs().sum() == 0  # only the class-0 anchor


def test_ema_decay_schedule() -> None:
    assert ema_decay_at(100, 100, 0.99) == 0.0  # the first EMA step copies the student
    assert ema_decay_at(101, 100, 0.99) == 0.5
    assert ema_decay_at(150, 100, 0.99) == pytest.approx(1 - 1 / 51)
    assert ema_decay_at(199, 100, 0.99) == pytest.approx(0.99)
    assert ema_decay_at(5000, 100, 0.99) == 0.99


def test_teacher_is_the_student_during_the_first_u2pl_epoch_then_ema() -> None:
    """train_semi.py: during epoch sup_only_epoch the teacher's parameters alias the student's, later the EMA with
    decay min(1 - 1/(it - sup_only_iters + 1), ema_decay). 3 steps per epoch, sup_only_epoch 1, the student's weight
    is it + 1 after the step of iteration it, the teacher's starts at 100."""
    student = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    teacher = build_teacher(student)
    with torch.no_grad():
        teacher[0].weight.fill_(100.0)
        teacher[1].running_mean.fill_(-5.0)

    def run(ema_decay: float) -> list[float]:
        t = build_teacher(teacher)
        seen = []
        for it in range(9):
            with torch.no_grad():
                student[0].weight.fill_(it + 1.0)
            update_teacher(t, student, epoch=it // 3, it=it, sup_only_epoch=1, sup_only_iters=3, ema_decay=ema_decay)
            seen.append(float(t[0].weight))
        assert float(t[1].running_mean) == -5.0  # parameters only: BatchNorm statistics stay the teacher's
        return seen

    # epoch 0: untouched; epoch 1: the student (4, 5, 6); epoch 2: decay 3/4, 4/5, 5/6:
    # 0.75 * 6 + 0.25 * 7 = 6.25; 0.8 * 6.25 + 0.2 * 8 = 6.6; 5/6 * 6.6 + 1/6 * 9 = 7.0
    # (the earlier copy-once-then-average teacher gave 4, 4.5, 5 in epoch 1)
    assert run(0.99) == pytest.approx([100, 100, 100, 4, 5, 6, 6.25, 6.6, 7.0])
    # ema_decay caps the decay: 0.7 * 6 + 0.3 * 7 = 6.3; 0.7 * 6.3 + 0.3 * 8 = 6.81; 0.7 * 6.81 + 0.3 * 9 = 7.467
    assert run(0.7) == pytest.approx([100, 100, 100, 4, 5, 6, 6.3, 6.81, 7.467])


# --------------------------------------------------------------------------------------------- augmentation
def _image_and_label(h: int, w: int, cls: int) -> tuple[Image.Image, Image.Image]:
    rgb = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(np.full((h, w), cls, np.uint8), mode="L")


def test_crop_pads_like_the_official_code() -> None:
    """augmentation.py Crop: the missing size is padded pad // 2 before and the rest after, image with 0 (after
    normalisation), label with 0 (its `ignore_label` is forced to 0); label_pad=255 ignores the padding instead.
    A 5 x 6 image (label 3) into an 8 x 8 crop at scale 1 without flip: pad rows 1 + 2, columns 1 + 1."""
    image, seg = _image_and_label(5, 6, 3)
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[1:6, 1:7] = 3
    t = U2PLSegTransform(8, scale_range=(1.0, 1.0), hflip=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    img, label = t(image, seg)
    assert torch.equal(label, expected)
    ref = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.equal(img[:, 1:6, 1:7], ref) and img[:, expected == 0].abs().sum() == 0
    _, label255 = U2PLSegTransform(8, scale_range=(1.0, 1.0), hflip=0.0, label_pad=255)(image, seg)
    assert torch.equal(label255, torch.where(expected == 3, 3, 255))
    # unlabelled: validity and the diagnostic ground truth (255 on padding; all 255 without a seg.png)
    _, valid, truth = t.unlabeled(image, seg)
    assert torch.equal(valid, expected == 3) and torch.equal(truth, torch.where(expected == 3, 3, 255))
    assert (t.unlabeled(image)[2] == 255).all()
    # larger than the crop: a window of the image, no padding
    big_img, big_seg = _image_and_label(12, 10, 1)
    img, label = t(big_img, big_seg)
    assert img.shape == (3, 8, 8) and (label == 1).all()


def test_unlabelled_ground_truth_does_not_change_the_draws() -> None:
    image, seg = _image_and_label(20, 14, 2)
    t = U2PLSegTransform(16, hflip=0.5)
    outs = []
    for s in (seg, None):
        torch.manual_seed(7)
        outs.append(t.unlabeled(image, s))
    torch.manual_seed(7)
    labelled = t(image, seg)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0], labelled[0])


def test_scale_is_drawn_below_or_above_one_with_equal_chance() -> None:
    """augmentation.py RandResize: uniform in [0.5, 1] or [1, 2], each with probability 1/2: mean 0.5 * 0.75 + 0.5 *
    1.5 = 1.125 and half the draws below 1 (uniform on [0.5, 2] would give mean 1.25 and a third below 1)."""
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([draw_scale((0.5, 2.0), g) for _ in range(20000)])
    assert 0.5 <= float(s.min()) and float(s.max()) <= 2.0
    below = s < 1
    assert float(below.float().mean()) == pytest.approx(0.5, abs=0.015)
    assert float(s.mean()) == pytest.approx(1.125, abs=0.01)
    assert float(s[below].mean()) == pytest.approx(0.75, abs=0.01) and float(s[~below].mean()) == pytest.approx(
        1.5, abs=0.02)
    # the transform resizes by that draw, truncating the size (int(side * s)), as the code
    image, seg = _image_and_label(20, 20, 1)
    t = U2PLSegTransform(48)
    for seed in range(5):
        torch.manual_seed(seed)
        scale = draw_scale((0.5, 2.0))
        torch.manual_seed(seed)
        assert int(t.unlabeled(image, seg)[1].sum()) == int(20 * scale) ** 2
    with pytest.raises(ValueError, match="u2pl.scale_range"):
        U2PLSegTransform(8, scale_range=(1.2, 2.0))


# ------------------------------------------------------------------------------------------------ diagnostics
def test_pseudo_label_metrics_equal_hand_computation() -> None:
    names = ["bg", "cat", "dog"]
    pseudo = torch.tensor([[0, 0, 1, 1, 2, 255, 0, 1]])
    truth = torch.tensor([[0, 1, 1, 1, 0, 2, 255, 1]])
    kept = torch.tensor([[True, False, True, True, True, True, True, False]])
    m = pseudo_label_metrics(pseudo, kept, truth, names)
    # pixels with both: 0..4 and 7 (6 pixels), hits 0, 2, 3, 7 -> 4/6; kept among them 0, 2, 3, 4 -> hits 3/4
    assert float(m["pseudo/acc"]) == pytest.approx(4 / 6) and float(m["pseudo/acc_kept"]) == pytest.approx(3 / 4)
    # truth bg at 0, 4 (hit 0) -> 1/2; cat at 1, 2, 3, 7 -> 3/4; dog only where pseudo is 255 -> absent
    assert float(m["pseudo/recall/bg"]) == pytest.approx(0.5) and float(m["pseudo/recall/cat"]) == 0.75
    assert "pseudo/recall/dog" not in m
    assert pseudo_label_metrics(pseudo, kept, torch.full_like(truth, 255), names) == {}


# ------------------------------------------------------------------------------------------------ evaluation
def test_miou_equals_a_reference() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 9, 7), generator=g)
    target[0, :2] = 255
    pred = torch.where(torch.rand(3, 9, 7, generator=g) < 0.6, target.clamp(max=3), torch.randint(0, 4, (3, 9, 7),
                                                                                                   generator=g))
    pred[pred == 3] = 2  # class 3 never predicted
    metric = SegmentationMetric(4)
    metric.update(pred[:2], target[:2])
    metric.update(list(pred[2:]), list(target[2:]))
    result = metric.compute()
    keep = target != 255
    p, t = pred[keep].numpy(), target[keep].numpy()
    ious = []
    for c in range(4):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
    assert result["mIoU"] == pytest.approx(np.nanmean(ious), rel=1e-6)
    assert result["pixel_acc"] == pytest.approx(np.mean(p == t), rel=1e-6)


def test_sliding_window_equals_whole_image_for_a_pointwise_model() -> None:
    class Pointwise(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 1)

        def forward(self, x):
            return {"pred": self.conv(x)}

    torch.manual_seed(0)
    model = Pointwise()
    x = torch.randn(1, 3, 23, 30)
    with torch.no_grad():
        whole = whole_logits(model, x)
        for crop in (8, 16, 40):  # 40: larger than the image -> padded
            slid = slide_logits(lambda t: whole_logits(model, t), x, crop)
            torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- splits
def test_label_split_is_seeded_and_sized() -> None:
    ids = [f"im{i:04d}" for i in range(1000)]
    lab, unl = label_split(ids, "1/16", seed=3)
    assert len(lab) == 62 and len(unl) == 938 and not set(lab) & set(unl) and sorted(lab + unl) == ids
    assert label_split(ids, "1/16", seed=3) == (lab, unl)
    assert label_split(ids, "1/16", seed=4)[0] != lab
    assert parse_labeled("1464", 10582) == 1464 and parse_labeled(0.5, 10) == 5
    with pytest.raises(ValueError, match="labelled subset"):
        parse_labeled("2000", 100)


# --------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("arch,kwargs", [("resnet10t", {}), ("vit_tiny_patch16_224",
                                                             {"embed_dim": 32, "depth": 2, "num_heads": 2})])
def test_segmentation_net_outputs_and_lr_groups(arch, kwargs) -> None:
    from sslpipe.models.segmentation import build_segmentation_net

    torch.manual_seed(0)
    net = build_segmentation_net(arch, 5, img_size=64, patch_size=8 if "vit" in arch else None, model_kwargs=kwargs,
                                 channels=16, aspp_channels=8, dilations=(1, 2, 3), rep_dim=256,
                                 vit_high_stride=16)
    out = net(torch.randn(2, 3, 64, 64))
    assert out["pred"].shape == (2, 5, 16, 16) and out["rep"].shape == (2, 256, 16, 16)
    assert set(dict(net.named_children())) == {"encoder", "decoder"}
    no_rep = build_segmentation_net(arch, 5, img_size=64, patch_size=8 if "vit" in arch else None,
                                    model_kwargs=kwargs, channels=16, aspp_channels=8, rep_dim=None)
    assert set(no_rep(torch.randn(2, 3, 64, 64))) == {"pred"}


def test_segmentation_net_from_a_vit_export_keeps_stochastic_depth(tmp_path) -> None:
    """A ViT export takes the recipe's drop_path_rate (linear over the blocks, as at random init) and nothing else of
    model.kwargs: its tensors are the export's, tensor for tensor."""
    import timm
    from helpers import TINY_VIT

    from sslpipe.models.segmentation import build_segmentation_net
    from sslpipe.weights.export import export_backbone

    args = {**TINY_VIT, "depth": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    export = export_backbone(model, tmp_path / "vit", arch="vit_tiny_patch16_224", model_args=args, img_size=16,
                             mean=[0.5] * 3, std=[0.5] * 3, source={"which": "test"})
    net = build_segmentation_net("ignored", 3, init_from=str(export), img_size=16, channels=8, aspp_channels=8,
                                 model_kwargs={"drop_path_rate": 0.3, "embed_dim": 64})
    block = net.encoder.pyramid.backbone.blocks[-1].block
    assert block.norm1.normalized_shape == (32,) and block.drop_path1.drop_prob == pytest.approx(0.3)
    fresh = build_segmentation_net("ignored", 3, init_from=str(export), img_size=16, channels=8, aspp_channels=8)
    assert isinstance(fresh.encoder.pyramid.backbone.blocks[-1].block.drop_path1, torch.nn.Identity)


def test_segmentation_net_from_an_export(tmp_path) -> None:
    import timm

    from sslpipe.models.segmentation import build_segmentation_net
    from sslpipe.weights.export import export_backbone

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    export = export_backbone(model.eval(), tmp_path / "export", arch="resnet10t", model_args={}, img_size=32,
                             mean=(0.5,) * 3, std=(0.25,) * 3, source={"which": "test"})
    net = build_segmentation_net("ignored", 3, init_from=str(export), output_stride=8, channels=8, aspp_channels=8)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(net.encoder.model.state_dict()[name], value)
    low, high = net.encoder(torch.randn(1, 3, 64, 64))
    assert low.shape[-1] == 16 and high.shape[-1] == 8  # dilated: output stride 8
