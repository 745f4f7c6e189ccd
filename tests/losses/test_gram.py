"""DINOv3's Gram loss: a hand-computed example, the options, and the official formula on the same inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslpipe.losses.gram import GramLoss


def official_gram_loss(output_feats, target_feats, *, apply_norm=True, img_level=True, remove_neg=False,
                       remove_only_teacher_neg=False):
    """facebookresearch/dinov3 loss/gram_loss.py GramLoss.forward, step by step as it reads (our transcription)."""
    output_feats, target_feats = output_feats.float(), target_feats.float()
    if apply_norm:
        target_feats = F.normalize(target_feats, dim=-1)
    if not img_level and len(target_feats.shape) == 3:
        target_feats = target_feats.flatten(0, 1)
    target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))
    if apply_norm:
        output_feats = F.normalize(output_feats, dim=-1)
    if not img_level and len(output_feats.shape) == 3:
        output_feats = output_feats.flatten(0, 1)
    student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
    return torch.nn.MSELoss()(student_sim, target_sim)


def test_hand_computed_example() -> None:
    """One image, two patches: the student's are orthogonal (G_s = I), the teacher's equal (G_t = all ones after
    normalisation): mean((I - 1)^2) over 4 entries = 2 / 4."""
    student = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [5.0, 0.0]]])
    assert GramLoss()(student, teacher).item() == pytest.approx(0.5)
    assert GramLoss(normalized=False)(student, teacher).item() == pytest.approx(
        ((9 - 1) ** 2 + 5 ** 2 * 2 + (4 - 25) ** 2) / 4)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # G_t = [[1, -1], [-1, 1]]
    assert GramLoss(remove_neg=True)(student, opposite).item() == pytest.approx(0.0)  # negatives gone: I vs I
    assert GramLoss(remove_only_teacher_neg=True)(student, opposite).item() == pytest.approx(0.0)


@pytest.mark.parametrize("options", [
    {}, {"img_level": False}, {"normalized": False}, {"remove_neg": True}, {"remove_only_teacher_neg": True},
    {"img_level": False, "remove_only_teacher_neg": True},
])
def test_equals_the_official_formula(options: dict) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    official = {k.replace("normalized", "apply_norm"): v for k, v in options.items()}
    torch.testing.assert_close(GramLoss(**options)(student, teacher),
                               official_gram_loss(student, teacher, **official), rtol=1e-6, atol=1e-7)


def test_gradient_reaches_the_student_only() -> None:
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, requires_grad=True)
    GramLoss()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_refusals() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match=r"\(B, P, D\) features of one shape"):
        GramLoss()(torch.zeros(2, 4, 3), torch.zeros(2, 5, 3))
