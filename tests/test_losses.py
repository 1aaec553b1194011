import pytest
import torch
from monai.losses import DiceCELoss

from fias_monai.losses import FeatureMixingLoss, nonempty_subsets


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
