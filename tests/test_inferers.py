"""Test-time flips: ``fias_monai.inferers.FlipAveragingInferer`` and the bundle switch that turns them on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.inferers import SimpleInferer, SliceInferer

from fias_monai.inferers import FlipAveragingInferer, flip_combinations

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


class LeftHalfNet(torch.nn.Module):
    """Two classes whatever the input: class 1 on the left half of the last axis (logit +4), class 0 elsewhere.

    The answer is fixed by position, not by content, so each flip moves it and only a flip back puts it
    where it belongs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        logit1 = torch.full_like(x[:, :1], -4.0)
        logit1[..., : w // 2] = 4.0
        return torch.cat([torch.zeros_like(logit1), logit1], dim=1)


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_flip_combinations_lists_every_non_empty_set_of_axes():
    assert flip_combinations([0, 1]) == [(0,), (1,), (0, 1)]
    assert flip_combinations([1, 0, 1]) == [(0,), (1,), (0, 1)]
    assert len(flip_combinations([0, 1, 2])) == 7


def test_no_flips_returns_the_inner_inferers_output_unchanged():
    x = torch.randn(2, 1, 8, 8)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    assert torch.equal(FlipAveragingInferer(SimpleInferer())(x, net), net(x))


def test_a_flip_that_moves_the_answer_is_flipped_back_and_averaged():
    # flips of the first spatial axis leave a left/right answer where it was: the probabilities stay the network's
    x = torch.randn(1, 1, 6, 8)
    prob = FlipAveragingInferer(SimpleInferer(), [[0]])(x, LeftHalfNet()).exp()
    assert torch.allclose(prob[0, 1, :, :4], torch.full((6, 4), _sigmoid(4)), atol=1e-6)
    assert torch.allclose(prob[0, 1, :, 4:], torch.full((6, 4), _sigmoid(-4)), atol=1e-6)
    # two of the four views mirror the last axis: the network's left half lands on the right, and the mean
    # probability of class 1 is (sigmoid(4) + sigmoid(-4)) / 2 = 0.5 everywhere (without the flip back: sigmoid(4)
    # on the left)
    prob = FlipAveragingInferer(SimpleInferer(), flip_combinations([0, 1]))(x, LeftHalfNet()).exp()
    assert torch.allclose(prob[0, 1], torch.full((6, 8), 0.5), atol=1e-6)
    assert torch.allclose(prob.sum(1), torch.ones(1, 6, 8), atol=1e-6)


def test_a_mirror_symmetric_network_gives_its_own_softmax_and_argmax():
    torch.manual_seed(0)
    # a 1x1 convolution commutes with flips: every view gives the same probabilities
    net = torch.nn.Conv2d(1, 4, 1)
    x = torch.randn(2, 1, 16, 16)
    out = FlipAveragingInferer(SimpleInferer(), flip_combinations([0, 1]))(x, net)
    assert torch.allclose(out.exp(), torch.softmax(net(x), 1), atol=1e-5)
    assert torch.equal(out.argmax(1), net(x).argmax(1))


def test_slice_inferer_volumes_flip_in_plane_and_keep_the_slice_order():
    # a volume (B, C, H, W, D) goes through a 2D network slice by slice; the slices differ along D
    vol = torch.arange(5.0).view(1, 1, 1, 1, 5).expand(1, 1, 8, 8, 5).contiguous()

    class SliceValueNet(torch.nn.Module):
        def forward(self, x):  # class 1's logit is the slice's value, on the left half only
            out = LeftHalfNet()(x)
            out[:, 1] = torch.where(out[:, 1] > 0, x[:, 0], -x[:, 0])
            return out

    slices = SliceInferer(roi_size=(8, 8), spatial_dim=2)
    # flipping H (spatial axis 0) leaves each slice's answer in place, slice d's value d included
    prob = FlipAveragingInferer(slices, [[0]])(vol, SliceValueNet()).exp()
    for d in range(5):
        assert prob[0, 1, 0, 0, d].item() == pytest.approx(_sigmoid(d), abs=1e-6)
        assert prob[0, 1, 0, 7, d].item() == pytest.approx(_sigmoid(-d), abs=1e-6)
    # flipping W (spatial axis 1) mirrors it: (sigmoid(d) + sigmoid(-d)) / 2 = 0.5 (an axis mapped to H or to
    # the slice axis D, which the per-slice network cannot tell from the identity, would leave sigmoid(d))
    prob = FlipAveragingInferer(slices, [[1]])(vol, SliceValueNet()).exp()
    assert torch.allclose(prob[0, 1], torch.full((8, 8, 5), 0.5), atol=1e-6)


def test_bad_flips_raise_before_any_forward_pass():
    calls = []

    def net(x):
        calls.append(x.shape)
        return x

    with pytest.raises(ValueError, match=r"flip axes \(2,\) are not among the input's 2 spatial axes"):
        FlipAveragingInferer(SimpleInferer(), [[2]])(torch.zeros(1, 1, 4, 4), net)
    assert calls == []
    with pytest.raises(ValueError, match="empty flip"):
        FlipAveragingInferer(SimpleInferer(), [[0], []])


def test_test_time_flips_is_one_switch_for_validation_evaluation_and_inference():
    # in a fresh interpreter: the configs must import what they name themselves (this module's imports would hide
    # a missing one, as they did once)
    code = f"""
import json
from monai.bundle import ConfigParser
c = {str(CONFIGS)!r}
pipelines = {{"validation": ([c + "/train.json", c + "/acdc.json"], "validate#inferer"),
             "evaluation": ([c + "/train.json", c + "/acdc.json", c + "/evaluate.json"], "validate#inferer"),
             "inference": ([c + "/inference.json", c + "/acdc.json"], "inferer")}}
out = {{}}
for value in (True, False, "True", "false"):  # True first: the expression needs the import itself
    for name, (configs, key) in pipelines.items():
        parser = ConfigParser()
        parser.read_config(configs)
        parser.update({{"test_time_flips": value}})
        inferer = parser.get_parsed_content(key)
        out[f"{{value!r}} {{name}}"] = [type(inferer).__name__, type(inferer.inferer).__name__, inferer.flips]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CONFIGS.parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 12
    for key, (kind, inner, flips) in out.items():
        on = key.split()[0] in ("True", "'True'")
        assert (kind, inner) == ("FlipAveragingInferer", "SliceInferer"), key
        assert flips == ([[0], [1], [0, 1]] if on else []), key
