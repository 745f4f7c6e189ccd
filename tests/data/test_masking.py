"""iBOT mask generator: published statistics, the exact BEiT acceptance rule, rand mode, schedules, seeding."""

import math
import random

import numpy as np
import pytest

from sslpipe.data.masking import MaskGenerator


class ScriptedRng:
    """Returns scripted values and records the bounds it was asked for (checks the algorithm step by step)."""

    def __init__(self, uniforms, randints):
        self.uniforms, self.randints = list(uniforms), list(randints)
        self.uniform_calls, self.randint_calls = [], []

    def uniform(self, a, b):
        self.uniform_calls.append((a, b))
        return self.uniforms.pop(0)

    def randint(self, a, b):
        self.randint_calls.append((a, b))
        return self.randints.pop(0)


def test_published_setting_statistics():
    random.seed(0)
    gen = MaskGenerator(grid=(14, 14), pred_ratio=[0, 0.3], pred_ratio_var=[0, 0.2])
    counts = np.array([gen().sum() for _ in range(2000)])
    zero = counts == 0
    # half the crops draw r = 0; a few r > 0 crops can also end empty (10 rejected attempts in the first round)
    assert 0.45 < zero.mean() < 0.56
    frac = counts[~zero] / 196
    # never above the largest target 0.5 * 196; the smallest first block is 2x6 = 12 cells (area >= 16, rounding)
    assert frac.max() <= 0.5
    assert counts[~zero].min() >= 12
    # r ~ U(0.1, 0.5) has mean 0.3; BEiT only undershoots, by a few cells at most on average
    assert 0.26 < frac.mean() <= 0.305


def test_never_exceeds_target():
    random.seed(1)
    gen = MaskGenerator(grid=(14, 14))
    for target in np.linspace(0, 120, 61):
        for _ in range(5):
            assert gen.block_mask(float(target)).sum() <= target


def test_single_block_is_a_rectangle():
    # 5x5 grid, target 16, min area 16: the only acceptable block is a 4x4 square (h, w < 5), after which the
    # budget is 0; so every non-empty mask is exactly one 4x4 square, at one of the 4 possible positions
    random.seed(2)
    gen = MaskGenerator(grid=(5, 5))
    corners = set()
    for _ in range(300):
        m = gen.block_mask(16.0)
        if m.any():
            rows, cols = np.nonzero(m)
            top, left = rows.min(), cols.min()
            assert m.sum() == 16 and m[top : top + 4, left : left + 4].all()
            corners.add((top, left))
    assert corners == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_block_algorithm_step_by_step():
    log_a = (math.log(0.3), math.log(1 / 0.3))
    rng = ScriptedRng(
        # round 1: area 20, aspect 1 -> 4x4 at (2, 3);
        # round 2: same place (0 new, rejected), then (4, 3): 8 new cells <= budget 14, accepted;
        # round 3: ten 4x4 blocks far away (16 new > budget 6) -> stop
        uniforms=[20.0, 0.0, 16.0, 0.0, 16.0, 0.0] + [16.0, 0.0] * 10,
        randints=[2, 3, 2, 3, 4, 3] + [10, 10] * 10,
    )
    gen = MaskGenerator(grid=(14, 14), rng=rng)
    mask = gen.block_mask(30.0)
    expected = np.zeros((14, 14), dtype=bool)
    expected[2:8, 3:7] = True
    np.testing.assert_array_equal(mask, expected)
    assert rng.uniform_calls[0] == (16, 30.0) and rng.uniform_calls[1] == pytest.approx(log_a)
    assert rng.uniform_calls[2] == (16, 14.0) and rng.uniform_calls[6] == (16, 6.0)
    assert rng.randint_calls[0] == (0, 10)
    assert len(rng.uniform_calls) == 26 and not rng.uniforms


def test_min_num_patches_none_uses_grid_formula():
    rng = ScriptedRng(uniforms=[5.0, 0.0] + [5.0, 0.0] * 10, randints=[0, 0] + [0, 0] * 10)
    MaskGenerator(grid=(8, 7), min_num_patches=None, rng=rng).block_mask(6.0)
    assert rng.uniform_calls[0] == (4, 6.0)  # (min(8, 7) // 3) ** 2


def test_rand_mode_exact_count():
    random.seed(3)
    gen = MaskGenerator(grid=(14, 14), pred_ratio=0.3, pred_ratio_var=0.0, pred_shape="rand")
    for _ in range(50):
        assert gen().sum() == 58  # floor(0.3 * 196 = 58.8)
    gen = MaskGenerator(grid=(7, 7), pred_ratio=[0.1, 0.5], pred_ratio_var=[0.1, 0.0], pred_shape="rand")
    counts = {int(gen().sum()) for _ in range(200)}
    assert max(counts) == 24  # 0.5 * 49 = 24.5 -> 24; the other candidate r ~ U(0, 0.2) gives <= 9
    assert all(c == 24 or c <= 9 for c in counts)


def test_pred_ratio_draws():
    random.seed(4)
    gen = MaskGenerator(pred_ratio=[0, 0.3], pred_ratio_var=[0, 0.2])
    r = np.array([gen.get_pred_ratio() for _ in range(4000)])
    nz = r[r != 0]
    assert 0.46 < (r == 0).mean() < 0.54
    assert nz.min() >= 0.1 and nz.max() <= 0.5 and abs(nz.mean() - 0.3) < 0.01
    # a one-element list means that scalar: r always 0.3, every block mask non-empty
    gen = MaskGenerator(pred_ratio=[0.3], pred_ratio_var=[0])
    assert all(gen.get_pred_ratio() == 0.3 for _ in range(20))
    assert all(gen().sum() > 0 for _ in range(300))


def test_pred_start_epoch():
    random.seed(5)
    gen = MaskGenerator(pred_ratio=0.3, pred_ratio_var=0.0, pred_start_epoch=2)
    gen.set_epoch(1)
    assert all(not gen().any() for _ in range(20))
    gen.set_epoch(2)
    assert all(gen().any() for _ in range(20))


def test_seeded_determinism():
    gen = MaskGenerator()
    random.seed(7)
    a = [gen() for _ in range(20)]
    random.seed(7)
    b = [gen() for _ in range(20)]
    assert all((x == y).all() for x, y in zip(a, b))
    c = [MaskGenerator(rng=random.Random(3))() for _ in range(1)]
    d = [MaskGenerator(rng=random.Random(3))() for _ in range(1)]
    assert (c[0] == d[0]).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pred_ratio": [0.3, 0.2], "pred_ratio_var": [0.1, 0.1, 0.1]},
        {"pred_ratio": 0.1, "pred_ratio_var": 0.2},
        {"pred_shape": "square"},
        {"grid": (0, 4)},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="MaskGenerator"):
        MaskGenerator(**kwargs)
