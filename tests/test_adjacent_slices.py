"""2.5D input (``context_slices``, :class:`fias_monai.transforms.AdjacentSlicesd`): the channel layout of the
transform, and the bundle's training, validation and inference with it (CPU, tiny network, tiny data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import TINY_BUNDLE as TINY, intensity_coded_inference
from fias_monai.data import make_demo_dataset
from fias_monai.transforms import AdjacentSlicesd, adjacent_slices

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN, INFER, META = CONFIGS / "train.json", CONFIGS / "inference.json", CONFIGS / "metadata.json"


def _volume(channels=2, depth=5) -> torch.Tensor:
    """(C, 3, 2, D) whose voxel value is 100 * c + 10 * z + (a position code), so every voxel says where it is from."""
    c, z = torch.meshgrid(torch.arange(channels), torch.arange(depth), indexing="ij")
    inplane = torch.arange(6.0).view(1, 3, 2, 1)
    return (100.0 * c + 10.0 * z).view(channels, 1, 1, depth) + inplane


@pytest.mark.parametrize("padding_mode", ["edge", "zeros"])
def test_each_slice_carries_its_neighbours_as_channels(padding_mode):
    x = _volume()
    out = adjacent_slices(x, 2, padding_mode)
    assert out.shape == (2 * 5, 3, 2, 5)  # C * (2k + 1)
    for c in range(2):
        for j, offset in enumerate(range(-2, 3)):
            for z in range(5):
                src = z + offset
                if 0 <= src < 5:
                    expected = x[c, :, :, src]
                elif padding_mode == "edge":
                    expected = x[c, :, :, min(max(src, 0), 4)]
                else:
                    expected = torch.zeros(3, 2)
                torch.testing.assert_close(out[c * 5 + j, :, :, z], expected, msg=f"c={c} offset={offset} z={z}")
    torch.testing.assert_close(out[2::5], x)  # the middle channel of each group is the slice itself


def test_geometry_and_transform_stack_are_kept_and_arrays_stay_arrays():
    affine = torch.tensor([[-1.5, 0, 0, 3], [0, 1.2, 0, -4], [0, 0, 8.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    img = MetaTensor(_volume(1, 4), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    img.applied_operations.append({"class": "Resize", "id": 1})
    out = AdjacentSlicesd("image", context=1)({"image": img, "label": img[:1]})
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (3, 3, 2, 4)
    torch.testing.assert_close(out["image"].affine, affine)
    assert out["image"].meta["filename_or_obj"] == "case.nii.gz"
    assert [op["class"] for op in out["image"].applied_operations] == ["Resize"]
    assert out["label"].shape == (1, 3, 2, 4)  # only the given keys
    arr = adjacent_slices(np.asarray(_volume(1, 4)), 1)
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 3, 2, 4)
    assert adjacent_slices(img, 0) is img  # context 0: untouched


def test_bad_arguments_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="context must be 0 or more"):
        AdjacentSlicesd("image", context=-1)
    with pytest.raises(ValueError, match="padding_mode must be 'edge' or 'zeros'"):
        AdjacentSlicesd("image", padding_mode="reflect")
    slice2d = MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "flat.nii.gz"})
    with pytest.raises(ValueError, match=r"\(C, H, W, D\); got shape \(1, 8, 8\) in flat.nii.gz"):
        adjacent_slices(slice2d, 1)


def _parser(configs, tiny=TINY, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update({**tiny, **overrides})
    return parser


def test_bundle_trains_and_validates_on_three_slice_input(tmp_path):
    """train.json with context_slices 1: the cached volumes carry the neighbours, the loader gives 3-channel
    slices, the network takes them and learns, and validation predicts on the label's grid."""
    demo = tmp_path / "demo"
    make_demo_dataset(demo, num_train=2, num_val=1, shape=(64, 64, 4))
    common = {"dataset_dir": str(demo), "batch_size": 2, "num_workers": 0, "cache_workers": 1,
              "device": "$torch.device('cpu')", "cuda_graph": False, "bundle_root": str(tmp_path / "bundle")}
    case = _parser([TRAIN], **common).get_parsed_content("train_datalist")[0]
    single = _parser([TRAIN], **common).get_parsed_content("train#volume_transforms")(dict(case))
    parser = _parser([TRAIN], **common, context_slices=1)
    stacked = parser.get_parsed_content("train#volume_transforms")(dict(case))
    assert stacked["image"].shape == (3, 64, 64, 4) and torch.equal(stacked["label"], single["label"])
    torch.testing.assert_close(stacked["image"][1], single["image"][0])
    torch.testing.assert_close(stacked["image"][0, ..., 1:], single["image"][0, ..., :-1])  # channel 0: slice below
    torch.testing.assert_close(stacked["image"][2, ..., :-1], single["image"][0, ..., 1:])  # channel 2: slice above

    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].shape == (2, 1, 64, 64)
    network = parser.get_parsed_content("network")
    assert network.in_channels == 3
    loss_fn = parser.get_parsed_content("loss")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    network.train()
    losses = []
    for _ in range(6):  # the same batch: the loss must fall, so the three channels reach the weights
        optimizer.zero_grad()
        loss = loss_fn(network(batch["image"]), batch["label"])
        loss.backward()
        assert network.encoder.stem[0].conv.weight.grad.abs().sum(dim=(0, 2, 3)).min() > 0  # every input channel
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    out = evaluator.state.output[0]  # the volume's prediction, back on the label's grid
    assert out["pred"].shape == out["label"].shape == (1, 64, 64, 4)


@pytest.mark.parametrize("peer", ["basicunet", "swinunetr"])
def test_peers_take_the_same_three_slice_input(peer):
    parser = _parser([TRAIN, CONFIGS / "peers" / f"{peer}.json"], tiny={}, context_slices=1, channels_last=False,
                     **({"network_def#feature_size": 12} if peer == "swinunetr" else {}))
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_inference_gives_each_slice_its_neighbours_along_world_z(tmp_path):
    """inference.json with context_slices 1 and a stand-in "network" that reads only the neighbour channel
    above (world +z after RAS reorientation): the written segmentation of each slice must be the intensity
    code of the next slice towards superior, in the input's own voxel order, whichever way the input's slice
    axis points; the most superior slice repeats itself (edge padding)."""
    from nibabel.orientations import io_orientation

    cases = {"lpi": ("LPI", (64, 64, 5)), "psr": ("PSR", (64, 4, 64)), "ras": ("RAS", (64, 64, 3))}
    results = intensity_coded_inference(tmp_path, INFER, META, cases, read_channel=2, in_channels=3,
                                        overrides={"context_slices": 1})  # channel 2: the slice above
    for name, (seg, affine, pred) in results.items():
        ornt = io_orientation(affine)
        axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])  # the input axis along world z, and its direction
        step = int(ornt[axis, 1])
        n = seg.shape[axis]
        expected = np.take(seg, np.clip(np.arange(n) + step, 0, n - 1), axis=axis)
        assert not np.array_equal(expected, seg)
        np.testing.assert_array_equal(np.asanyarray(pred.dataobj), expected, err_msg=f"{name}: wrong neighbour")


def test_inference_and_training_configs_stack_the_same_way():
    train, infer = json.loads(TRAIN.read_text()), json.loads(INFER.read_text())
    assert train["adjacent_slices"] == infer["adjacent_slices"] and train["context_slices"] == infer["context_slices"]
    assert train["in_channels"] == infer["in_channels"]
    assert train["network_def"]["in_channels"] == infer["network_def"]["in_channels"] == "@in_channels"
    for chain in (train["train"]["volume_transforms"], train["validate"]["preprocessing"]):
        assert chain["transforms"][-1] == "@adjacent_slices"  # after the resize, before slicing
    assert infer["preprocessing"]["transforms"][-2] == "@adjacent_slices"
