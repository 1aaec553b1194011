import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from fias_monai.losses import FeatureMixingLoss, label_border, nonempty_subsets


def test_subsets_are_the_seven_nonempty_ones():
    subsets = nonempty_subsets(3)
    assert len(subsets) == 7 and len(set(subsets)) == 7
    assert (0, 1, 2) in subsets and (0, 2) in subsets and () not in subsets


def test_mixing_equals_the_hand_written_sum_over_subsets():
    maps = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    y = torch.randint(0, 4, (2, 1, 8, 8))
    ref_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.4, lambda_ce=0.6)
    a, b, c = maps
    expected = sum(ref_fn(m, y) for m in (a, b, c, a + b, a + c, b + c, a + b + c))
    assert torch.allclose(FeatureMixingLoss()(maps, y), expected)
    assert torch.allclose(FeatureMixingLoss()(a, y), ref_fn(a, y))


def test_mixing_modes_score_the_named_combinations():
    maps = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    y = torch.randint(0, 4, (2, 1, 8, 8))
    ref_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.4, lambda_ce=0.6)
    a, b, c = maps
    separate = ref_fn(a, y) + ref_fn(b, y) + ref_fn(c, y)
    assert torch.allclose(FeatureMixingLoss(mixing="separate")(maps, y), separate)
    assert torch.allclose(FeatureMixingLoss(mixing="final")(maps, y), ref_fn(a + b + c, y))
    assert not torch.allclose(FeatureMixingLoss(mixing="all")(maps, y), separate)
    with pytest.raises(ValueError, match="mixing must be one of"):
        FeatureMixingLoss(mixing="sum")


def test_weights_are_the_papers_gamma():
    x, y = torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 1, 8, 8))
    dice = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=0.0)(x, y)
    ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0)(x, y)
    assert torch.allclose(FeatureMixingLoss()(x, y), 0.4 * dice + 0.6 * ce)


def test_confident_correct_prediction_scores_low_and_gradients_flow():
    y = torch.randint(0, 3, (2, 1, 8, 8))
    good = torch.nn.functional.one_hot(y[:, 0], 3).permute(0, 3, 1, 2).float() * 20
    bad = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss_fn = FeatureMixingLoss()
    assert loss_fn([good, good, good], y) < 0.05
    loss = loss_fn([bad, bad * 0.5, bad * 2], y)
    loss.backward()
    assert loss > 1.0 and bad.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="empty"):
        loss_fn([], y)


@pytest.mark.parametrize("kw", [dict(), dict(include_background=False), dict(batch=True),
                                dict(smooth_nr=0.0, smooth_dr=1e-6)], ids=str)
@pytest.mark.parametrize("spatial", [(8, 6), (4, 5, 6)], ids=["2d", "3d"])
def test_stacked_pass_equals_one_dicece_per_subset_with_gradients(kw, spatial):
    # the stacked pass is an optimisation: value and gradients must be DiceCELoss's, subset by subset
    maps = [torch.randn(3, 4, *spatial, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 4, (3, 1, *spatial))
    y[0, 0].view(-1)[:5] = 3
    ref_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.4, lambda_ce=0.6, **kw)
    a, b, c = maps
    expected = sum(ref_fn(m, y) for m in (a, b, c, a + b, a + c, b + c, a + b + c))
    loss_fn = FeatureMixingLoss(**kw)
    assert loss_fn.stacked
    got = loss_fn(maps, y)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, maps)
    expected_grads = torch.autograd.grad(expected, maps)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)


def test_options_outside_the_stacked_pass_fall_back_to_dicece():
    maps = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    y = torch.randint(0, 3, (2, 1, 8, 8))
    weight = torch.tensor([0.2, 1.0, 3.0])
    loss_fn = FeatureMixingLoss(weight=weight, squared_pred=True)
    assert not loss_fn.stacked
    ref_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.4, lambda_ce=0.6, weight=weight, squared_pred=True)
    a, b, c = maps
    expected = sum(ref_fn(m, y) for m in (a, b, c, a + b, a + c, b + c, a + b + c))
    assert torch.allclose(loss_fn(maps, y), expected)
    # and the stacked pass would have scored it differently (the options matter)
    assert not torch.allclose(FeatureMixingLoss()(maps, y), expected)


def test_bfloat16_logits_are_scored_in_float32():
    maps = [torch.randn(2, 4, 16, 16) for _ in range(3)]
    y = torch.randint(0, 4, (2, 1, 16, 16))
    low = FeatureMixingLoss()([m.bfloat16() for m in maps], y)
    assert low.dtype == torch.float32
    ref = FeatureMixingLoss()([m.bfloat16().float() for m in maps], y)
    assert abs(low.item() - ref.item()) < 0.02 * ref.item()


def test_label_border_marks_both_sides_and_not_the_image_edge():
    y = torch.zeros(1, 1, 6, 6)
    y[0, 0, 2:4, 2:4] = 1  # a 2x2 square: it and its one-voxel ring (diagonals included) are border
    border = label_border(y)
    assert border.shape == (1, 6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:5, 1:5] = True
    assert torch.equal(border[0], expected)
    assert label_border(y, width=2)[0].all()  # two voxels either side reach every voxel of this image
    halves = torch.zeros(1, 1, 6, 6)
    halves[..., 3:] = 2  # a border between columns 2 and 3 that runs into the image's edge
    assert torch.equal(label_border(halves)[0].nonzero()[:, 1].unique(), torch.tensor([2, 3]))
    assert not label_border(torch.full((2, 1, 5, 5), 3.0)).any()  # one label: no border, edges included
    cube = torch.zeros(1, 1, 5, 5, 5)
    cube[0, 0, 2, 2, 2] = 1
    assert label_border(cube).sum() == 27  # 3D: the voxel and its 26 neighbours
    with pytest.raises(ValueError, match="width must be >= 1"):
        label_border(y, width=0)
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        label_border(y[:, 0])


def test_border_weight_weighs_the_cross_entropy_of_border_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, 1, 8, 8)
    y[:, :, 2:6, 2:6] = 1
    y[:, :, 3:5, 3:5] = 2
    weight = 1.0 + 2.0 * label_border(y).double()
    ce = (F.cross_entropy(logits, y[:, 0].long(), reduction="none") * weight).mean()
    dice = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=0.0)(logits, y)
    got = FeatureMixingLoss(border_weight=2.0)(logits, y)
    assert torch.allclose(got, 0.4 * dice + 0.6 * ce, rtol=1e-12)
    assert got > FeatureMixingLoss()(logits, y)  # the border voxels' extra weight only adds
    assert torch.equal(FeatureMixingLoss(border_weight=0.0)(logits, y), FeatureMixingLoss()(logits, y))
    # CE alone: a border voxel's gradient is 3x the unweighted one, an interior voxel's is unchanged
    plain = torch.autograd.grad(FeatureMixingLoss(lambda_dice=0.0, lambda_ce=1.0)(logits, y), logits)[0]
    weighted = torch.autograd.grad(FeatureMixingLoss(lambda_dice=0.0, lambda_ce=1.0, border_weight=2.0)(logits, y),
                                   logits)[0]
    border = label_border(y)[:, None].expand_as(plain)
    assert torch.allclose(weighted[border], 3.0 * plain[border], rtol=1e-12)
    assert torch.equal(weighted[~border], plain[~border])
    # deep supervision: every mixed combination is weighed alike
    maps = [torch.randn(2, 3, 8, 8, dtype=torch.float64) for _ in range(3)]
    a, b, c = maps
    expected = sum(FeatureMixingLoss(border_weight=2.0)(m, y) for m in (a, b, c, a + b, a + c, b + c, a + b + c))
    assert torch.allclose(FeatureMixingLoss(border_weight=2.0)(maps, y), expected, rtol=1e-12)


def test_border_weight_errors():
    maps = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="border_weight must be >= 0"):
        FeatureMixingLoss(border_weight=-1.0)
    with pytest.raises(ValueError, match="border_width >= 1"):
        FeatureMixingLoss(border_weight=1.0, border_width=0)
    with pytest.raises(ValueError, match="DiceCELoss has no voxel weights"):
        FeatureMixingLoss(border_weight=1.0, squared_pred=True)
    with pytest.raises(ValueError, match="needs \\(B, 1, \\*spatial\\) class indices"):
        FeatureMixingLoss(border_weight=1.0)(maps, torch.randint(0, 2, (2, 3, 8, 8)).float())  # one-hot target
