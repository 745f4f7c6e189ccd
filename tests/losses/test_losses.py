"""DINO / iBOT losses and health metrics against explicit hand-written references."""

import math

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.loss import IBOTPatchLoss

from sslpipe.data.collate import mask_batch_fields
from sslpipe.losses import DINOLoss, IBOTLoss, health_metrics
from sslpipe.losses.health import embed_std, embedding_health, rankme


def softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ce(t_logits, s_logits, center, t_temp, s_temp):
    """- sum_k softmax((t - c)/tt)_k * log_softmax(s/ts)_k for one sample, plain python."""
    p = softmax([(a - c) / t_temp for a, c in zip(t_logits, center)])
    ls = log_softmax([a / s_temp for a in s_logits])
    return -sum(a * b for a, b in zip(p, ls))


def test_dino_loss_matches_hand_computed_pairs():
    torch.manual_seed(0)
    B, K, n_global, n_crops = 3, 5, 2, 4
    student = torch.randn(n_crops * B, K)
    teacher = torch.randn(n_global * B, K)
    loss_fn = DINOLoss(K, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, K))
    c = loss_fn.center[0].tolist()
    total, terms = 0.0, 0
    for q in range(n_global):
        for v in range(n_crops):
            if v == q:
                continue
            total += sum(ce(teacher[q * B + b].tolist(), student[v * B + b].tolist(), c, 0.05, 0.1)
                         for b in range(B)) / B
            terms += 1
    assert terms == 6
    got = loss_fn(student, teacher, teacher_temp=0.05, n_crops=n_crops, n_global=n_global)
    assert got.item() == pytest.approx(total / terms, rel=1e-5)


def test_dino_loss_equals_lightly_given_same_center():
    torch.manual_seed(1)
    B, K = 4, 16
    student = torch.randn(5 * B, K)
    teacher = torch.randn(2 * B, K)
    ours = DINOLoss(K)
    ours.center.copy_(torch.randn(1, K))
    ref = LightlyDINOLoss(output_dim=K, teacher_temp=0.07, warmup_teacher_temp=0.07)
    ref.center.copy_(ours.center.view(1, 1, K))
    want = ref(list(teacher.chunk(2)), list(student.chunk(5)), teacher_temp=0.07)
    got = ours(student, teacher, teacher_temp=0.07, n_crops=5, n_global=2)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    ours.record_center(teacher)
    ours.update_center()  # lightly updated its centre inside forward
    assert torch.allclose(ours.center, ref.center.view(1, K), atol=1e-6)


def test_the_centre_moves_once_per_step_over_all_its_batches():
    """Gradient accumulation: the two batches of a step move the centres as the whole batch does, once, after the
    step (each batch is centred with the step's centre meanwhile); the centre moved per batch before (0.9^2 per step,
    the second batch centred with the first). DINOv2's padded patch rows (weight 0) do not count."""
    from sslpipe.losses.dinov2 import DINOv2Loss

    g = torch.Generator().manual_seed(0)
    cls, patch = torch.randn(8, 5, generator=g), torch.randn(8, 3, 6, generator=g)
    masked, weight = torch.randn(10, 6, generator=g), torch.tensor([1.0] * 4 + [0.0] + [1.0] * 4 + [0.0])
    losses = [lambda: DINOLoss(5), lambda: IBOTLoss(5, 6, n_global=2, n_local=0),
              lambda: DINOv2Loss(5, 6, n_global=2, n_local=0, centering="softmax")]
    parts = [lambda loss, i: loss.record_center(cls[i]), lambda loss, i: loss.record_center(cls[i], patch[i]),
             lambda loss, i: loss.record_center(cls[i], masked[i], weight[i])]
    halves = [(slice(0, 4), slice(4, 8))] * 2 + [(slice(0, 5), slice(5, 10))]  # DINOv2: 5 masked rows, 1 padding
    for make, record, (first, second) in zip(losses, parts, halves):
        whole, split = make(), make()
        record(whole, slice(None))
        whole.update_center()
        for half in (first, second):
            record(split, half)
            assert not split.center.any()  # not moved before the step ends
        split.update_center()
        assert split.center.any() and torch.allclose(split.center, whole.center, atol=1e-6)
        assert torch.allclose(split.center2 if hasattr(split, "center2") else split.center,
                              whole.center2 if hasattr(whole, "center2") else whole.center, atol=1e-6)
        before = split.center.clone()
        split.update_center()  # nothing recorded since: unchanged
        assert torch.equal(split.center, before)
    # by hand, DINOv2's patch centre: 0.1 x the mean of the 8 counted rows
    v2 = DINOv2Loss(5, 6, n_global=2, n_local=0, centering="softmax")
    v2.record_center(cls, masked, weight)
    v2.update_center()
    torch.testing.assert_close(v2.center2.view(-1), 0.1 * masked[weight > 0].mean(dim=0))


def test_dino_center_update():
    loss_fn = DINOLoss(3, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss_fn.record_center(t)
    loss_fn.update_center()
    # 0.9 * C + 0.1 * mean = 0.9*[1,0,-1] + 0.1*[2,2,2]
    assert torch.allclose(loss_fn.center, torch.tensor([[1.1, 0.2, -0.7]]))


def test_dino_loss_rejects_single_view():
    with pytest.raises(ValueError, match="at least 2 views"):
        DINOLoss(4)(torch.randn(2, 4), torch.randn(2, 4), teacher_temp=0.04, n_crops=1, n_global=1)


def _ibot_case():
    torch.manual_seed(0)
    B, K, N, G, L = 2, 8, 4, 2, 2
    return dict(
        B=B, K=K, N=N, G=G, L=L,
        s_cls=torch.randn(G * B, K), s_loc=torch.randn(L * B, K), t_cls=torch.randn(G * B, K),
        s_patch=torch.randn(G * B, N, K), t_patch=torch.randn(G * B, N, K),
        # crop-major: rows = (crop0,img0), (crop0,img1), (crop1,img0), (crop1,img1); (crop0,img1) unmasked
        masks=torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool).view(4, 2, 2),
    )


def test_ibot_loss_matches_hand_computed():
    d = _ibot_case()
    B, K, N, G, L = d["B"], d["K"], d["N"], d["G"], d["L"]
    loss_fn = IBOTLoss(K, K, n_global=G, n_local=L, lambda1=0.7, lambda2=1.3)
    loss_fn.center.copy_(torch.randn(1, K))
    loss_fn.center2.copy_(torch.randn(1, 1, K))
    c1, c2 = loss_fn.center[0].tolist(), loss_fn.center2[0, 0].tolist()
    tt, tpt, ts = 0.04, 0.06, 0.1
    s_all = torch.cat([d["s_cls"], d["s_loc"]])
    cls_total, cls_terms, patch_total = 0.0, 0, 0.0
    for q in range(G):
        for v in range(G + L):
            if v != q:
                cls_total += sum(ce(d["t_cls"][q * B + b].tolist(), s_all[v * B + b].tolist(), c1, tt, ts)
                                 for b in range(B)) / B
                cls_terms += 1
        per_image = []
        for b in range(B):
            row = q * B + b
            m = d["masks"][row].flatten().tolist()
            s = sum(ce(d["t_patch"][row, i].tolist(), d["s_patch"][row, i].tolist(), c2, tpt, ts)
                    for i in range(N) if m[i])
            per_image.append(s / max(1, sum(m)))
        patch_total += sum(per_image) / B
    assert cls_terms == 6
    want_cls, want_patch = cls_total / cls_terms, patch_total / G
    out = loss_fn(d["s_cls"], d["s_patch"], d["t_cls"], d["t_patch"], d["masks"], teacher_temp=tt,
                  teacher_patch_temp=tpt, student_local_cls=d["s_loc"])
    assert out["cls"].item() == pytest.approx(want_cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(want_patch, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.7 * want_cls + 1.3 * want_patch, rel=1e-5)
    # the student's masked rows only, as IBOTHead gives them with mask_indices: the same loss
    fields = mask_batch_fields(d["masks"].reshape(G * B, N))
    rows = d["s_patch"].flatten(0, 1)[fields["mask_indices"]]
    same = loss_fn(d["s_cls"], rows, d["t_cls"], d["t_patch"], d["masks"], teacher_temp=tt, teacher_patch_temp=tpt,
                   student_local_cls=d["s_loc"], mask_indices=fields["mask_indices"])
    assert same["patch"].item() == pytest.approx(want_patch, rel=1e-5)
    with pytest.raises(ValueError, match="pass the mask_indices"):
        loss_fn(d["s_cls"], rows, d["t_cls"], d["t_patch"], d["masks"], teacher_temp=tt, teacher_patch_temp=tpt,
                student_local_cls=d["s_loc"])


def test_ibot_centres():
    d = _ibot_case()
    loss_fn = IBOTLoss(d["K"], d["K"], n_global=2, n_local=2)
    c1, c2 = torch.randn(1, d["K"]), torch.randn(1, 1, d["K"])
    loss_fn.center.copy_(c1)
    loss_fn.center2.copy_(c2)
    loss_fn.record_center(d["t_cls"], d["t_patch"])
    loss_fn.update_center()
    rows = d["t_cls"].shape[0]
    want1 = [0.9 * c1[0, k].item() + 0.1 * sum(d["t_cls"][r, k].item() for r in range(rows)) / rows
             for k in range(d["K"])]
    want2 = [0.9 * c2[0, 0, k].item()
             + 0.1 * sum(sum(d["t_patch"][r, i, k].item() for i in range(d["N"])) / d["N"] for r in range(rows)) / rows
             for k in range(d["K"])]
    assert loss_fn.center.shape == (1, d["K"]) and loss_fn.center2.shape == (1, 1, d["K"])
    assert loss_fn.center[0].tolist() == pytest.approx(want1, abs=1e-6)
    assert loss_fn.center2[0, 0].tolist() == pytest.approx(want2, abs=1e-6)


def test_ibot_patch_term_equals_lightly_per_view():
    d = _ibot_case()
    ours = IBOTLoss(d["K"], d["K"], n_global=2, n_local=2, lambda1=0.0)
    out = ours(d["s_cls"], d["s_patch"], d["t_cls"], d["t_patch"], d["masks"], teacher_temp=0.04,
               teacher_patch_temp=0.05, student_local_cls=d["s_loc"])
    ref = IBOTPatchLoss(output_dim=d["K"])
    B, per_view = d["B"], []
    for q in range(2):
        sl = slice(q * B, (q + 1) * B)
        m = d["masks"][sl]
        mf = m.flatten(1)
        ref.center.center.zero_()
        per_view.append(ref(d["t_patch"][sl][mf], d["s_patch"][sl][mf], m, teacher_temp=0.05).item())
    assert out["patch"].item() == pytest.approx(sum(per_view) / 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["patch"].item(), rel=1e-6)


def test_ibot_loss_gradient_reaches_only_student():
    d = _ibot_case()
    s_patch = d["s_patch"].clone().requires_grad_()
    t_patch = d["t_patch"].clone().requires_grad_()
    out = IBOTLoss(8, 8, 2, 2)(d["s_cls"], s_patch, d["t_cls"], t_patch, d["masks"], 0.04, 0.04, d["s_loc"])
    out["loss"].backward()
    assert t_patch.grad is None
    # unmasked patches get no gradient, masked ones do
    g = s_patch.grad.abs().sum(-1)
    assert torch.equal(g > 0, d["masks"].flatten(1))


def test_ibot_rejects_wrong_local_count():
    d = _ibot_case()
    with pytest.raises(ValueError, match="local crops"):
        IBOTLoss(8, 8, 2, 3)(d["s_cls"], d["s_patch"], d["t_cls"], d["t_patch"], d["masks"], 0.04, 0.04, d["s_loc"])


def test_health_uniform_collapse():
    K, B = 16, 6
    m = health_metrics(torch.zeros(B, K), torch.zeros(B, K), teacher_temp=0.04, student_temp=0.1,
                       teacher_patch=torch.zeros(B, 3, K), student_patch=torch.zeros(B, 3, K),
                       masks=torch.tensor([[1, 0, 0]] * B, dtype=torch.bool))
    assert m["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-6)
    assert m["student_entropy"] == pytest.approx(math.log(K), rel=1e-6)
    assert m["batch_entropy"] == pytest.approx(math.log(K), rel=1e-6)
    assert m["teacher_patch_entropy"] == pytest.approx(math.log(K), rel=1e-6)
    assert m["student_patch_entropy"] == pytest.approx(math.log(K), rel=1e-6)
    assert m["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert m["mask_ratio"] == pytest.approx(1 / 3)


def test_health_one_prototype_collapse_and_spread():
    K, B = 8, 4
    onehot = torch.full((B, K), -1e4)
    onehot[:, 3] = 0.0
    m = health_metrics(onehot, torch.zeros(B, K), teacher_temp=0.04, student_temp=0.1)
    assert m["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["batch_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["prototype_usage"] == pytest.approx(1 / K)
    assert m["kl_teacher_student"] == pytest.approx(math.log(K), rel=1e-5)  # KL(onehot || uniform) = log K
    spread = torch.full((B, K), -1e4)
    spread[torch.arange(B), torch.arange(B)] = 0.0  # B different prototypes
    m = health_metrics(spread, spread, teacher_temp=0.04, student_temp=0.1)
    assert m["prototype_usage"] == pytest.approx(B / K)
    assert m["batch_entropy"] == pytest.approx(math.log(B), rel=1e-5)
    assert m["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)


def _rankme_by_hand(singular_values: list[float], eps: float = 1e-7) -> float:
    total = sum(singular_values)
    p = [s / total + eps for s in singular_values]
    return math.exp(-sum(x * math.log(x) for x in p))


def test_rankme_of_collapsed_and_full_rank_features():
    torch.manual_seed(0)
    n, d = 256, 32
    collapsed = torch.randn(n, 1) * torch.randn(1, d)  # rank 1: every row on one line
    s = torch.linalg.svdvals(collapsed.double())[0].item()
    assert rankme(collapsed) == pytest.approx(_rankme_by_hand([s] + [0.0] * (d - 1)), rel=1e-4)
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-3)
    q, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))  # orthonormal columns: d singular values of 1
    assert rankme(q.float()) == pytest.approx(_rankme_by_hand([1.0] * d), rel=1e-5)
    assert rankme(q.float()) == pytest.approx(d, rel=1e-4)
    two = torch.cat([q[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64), torch.zeros(n, d - 2)], 1)
    assert rankme(two) == pytest.approx(_rankme_by_hand([3.0, 1.0] + [0.0] * (d - 2)), rel=1e-4)
    assert rankme(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-4)
    gaussian = torch.randn(4096, d)  # isotropic: singular values nearly equal, effective rank just under d
    assert rankme(gaussian) == pytest.approx(_rankme_by_hand(torch.linalg.svdvals(gaussian.double()).tolist()),
                                             rel=1e-4)
    assert 0.98 * d < rankme(gaussian) < d


def test_embed_std_is_zero_when_collapsed_and_one_over_sqrt_d_when_spread():
    torch.manual_seed(0)
    n, d = 4096, 64
    collapsed = torch.randn(1, d).repeat(n, 1) * torch.rand(n, 1)  # one direction, any length
    assert embed_std(collapsed) == pytest.approx(0.0, abs=1e-6)
    gaussian = torch.randn(n, d)
    unit = gaussian / gaussian.norm(dim=1, keepdim=True)
    assert embed_std(gaussian) == pytest.approx(unit.std(dim=0).mean().item(), rel=1e-5)
    assert embed_std(gaussian) == pytest.approx(1 / math.sqrt(d), rel=0.02)
    m = embedding_health(teacher=collapsed, student=gaussian)
    assert set(m) == {"rankme/teacher", "embed_std/teacher", "rankme/student", "embed_std/student"}
    assert m["rankme/teacher"] == pytest.approx(1.0, abs=1e-3) and m["rankme/student"] > 0.98 * d
