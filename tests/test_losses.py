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
