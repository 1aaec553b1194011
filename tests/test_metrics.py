"""Tests of fias_monai.metrics against hand-computed numbers (CPU, fast)."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch

from fias_monai.metrics import (
    CSV_COLUMNS,
    SUMMARY_COLUMNS,
    MeanDiceProtocol,
    MetricRow,
    ProtocolMetric,
    ProtocolMetricHandler,
    ProtocolResults,
    case_metrics,
    case_name_from_meta,
    make_rows,
    read_metrics_csv,
    spacing_from_meta,
    summarize,
    to_index_map,
    write_metrics_csv,
    write_summary,
)

SHAPE = (12, 12, 12)


def _vol():
    return np.zeros(SHAPE, dtype=np.int64)


# ----------------------------------------------------------------------------- single case
def test_cubes_known_overlap_dice():
    gt, pred = _vol(), _vol()
    gt[1:5, 1:5, 1:5] = 1  # 64 voxels
    pred[2:6, 1:5, 1:5] = 1  # 64 voxels, overlap 3*4*4 = 48
    res = case_metrics(pred, gt, num_classes=2)
    assert list(res) == [1]
    assert res[1][0] == pytest.approx(2 * 48 / 128, abs=1e-6)  # 0.75


def test_cubes_two_classes_dice():
    gt, pred = _vol(), _vol()
    gt[0:4, 0:4, 0:2] = 1  # 32
    pred[0:4, 0:4, 0:1] = 1  # 16, all inside -> 2*16/48
    gt[6:10, 6:10, 6:10] = 2  # 64
    pred[6:10, 6:10, 8:12] = 2  # 64, overlap 4*4*2 = 32 -> 0.5
    res = case_metrics(pred, gt, num_classes=3, compute_hd95=False)
    assert res[1][0] == pytest.approx(2 / 3, abs=1e-6)
    assert res[2][0] == pytest.approx(0.5, abs=1e-6)
    assert math.isnan(res[1][1]) and math.isnan(res[2][1])


def test_identical_masks_dice_one_hd_zero():
    gt = _vol()
    gt[3:8, 2:9, 4:7] = 1
    assert case_metrics(gt.copy(), gt, 2)[1] == pytest.approx((1.0, 0.0))


def test_single_voxel_shift_hd95_voxels_and_mm():
    gt, pred = _vol(), _vol()
    gt[5, 5, 2] = 1
    pred[5, 5, 5] = 1  # shifted by 3 voxels along the last axis
    dice, hd = case_metrics(pred, gt, 2)[1]
    assert dice == pytest.approx(0.0)
    assert hd == pytest.approx(3.0)
    # isotropic spacing 0.7 mm
    assert case_metrics(pred, gt, 2, spacing=0.7)[1][1] == pytest.approx(2.1)
    # per-axis spacing: only the last axis' spacing matters for a shift along it
    assert case_metrics(pred, gt, 2, spacing=(0.5, 0.8, 2.5))[1][1] == pytest.approx(7.5)


def test_anisotropic_spacing_diagonal_shift():
    gt, pred = _vol(), _vol()
    gt[1, 1, 6] = 1
    pred[4, 5, 6] = 1  # shift (3, 4, 0)
    assert case_metrics(pred, gt, 2)[1][1] == pytest.approx(5.0)
    # spacing (2, 1, 3): sqrt((3*2)^2 + (4*1)^2) = sqrt(52); axis order matters
    assert case_metrics(pred, gt, 2, spacing=(2.0, 1.0, 3.0))[1][1] == pytest.approx(math.sqrt(52.0), rel=1e-5)
    assert case_metrics(pred, gt, 2, spacing=(1.0, 2.0, 3.0))[1][1] == pytest.approx(math.sqrt(9 + 64), rel=1e-5)


def test_hd95_flavours_monai_vs_pooled():
    # GT one voxel, pred = that voxel + one 10 voxels away.
    # d(pred->gt) = [0, 10], d(gt->pred) = [0]
    # monai : max(p95([0, 10]), p95([0])) = 9.5 ; pooled (medpy/TransUNet): p95([0, 0, 10]) = 9.0
    gt, pred = _vol(), _vol()
    gt[5, 5, 1] = 1
    pred[5, 5, 1] = 1
    pred[5, 5, 11] = 1
    dice, hd = case_metrics(pred, gt, 2)[1]
    assert dice == pytest.approx(2 / 3, abs=1e-6)
    assert hd == pytest.approx(9.5)
    assert case_metrics(pred, gt, 2, hd95_method="pooled")[1][1] == pytest.approx(9.0)
    with pytest.raises(ValueError):
        case_metrics(pred, gt, 2, hd95_method="bogus")


def test_empty_case_rules():
    gt, pred = _vol(), _vol()
    gt[1:3, 1:3, 1:3] = 1  # class 1: both non-empty (identical) -> 1 / 0 computed
    pred[1:3, 1:3, 1:3] = 1
    pred[6:8, 6:8, 6:8] = 2  # class 2: pred non-empty, GT empty -> 1 / 0
    gt[9:11, 9:11, 9:11] = 3  # class 3: pred empty, GT non-empty -> 0 / 0
    # class 4: both empty -> 0 / 0
    gt[0, 11, 0] = 5  # class 5: GT non-empty, pred voxel far away -> computed
    pred[11, 0, 0] = 5
    res = case_metrics(pred, gt, num_classes=6)
    assert list(res) == [1, 2, 3, 4, 5]
    assert res[1] == pytest.approx((1.0, 0.0))
    assert res[2] == (1.0, 0.0)
    assert res[3] == (0.0, 0.0)
    assert res[4] == (0.0, 0.0)
    assert res[5][0] == pytest.approx(0.0)
    assert res[5][1] == pytest.approx(math.sqrt(11**2 + 11**2))


def test_input_formats_agree():
    gt, pred = _vol(), _vol()
    gt[1:5, 1:5, 1:5] = 1
    gt[6:9, 6:9, 6:9] = 2
    pred[2:6, 1:5, 1:5] = 1
    pred[6:9, 6:9, 7:10] = 2
    ref = case_metrics(pred, gt, 3)
    onehot_p = np.eye(3)[pred].transpose(3, 0, 1, 2)  # (C, H, W, D)
    onehot_g = torch.nn.functional.one_hot(torch.as_tensor(gt), 3).permute(3, 0, 1, 2).float()
    variants = [
        (pred[None], gt[None]),  # (1, H, W, D)
        (torch.as_tensor(pred, dtype=torch.float32)[None], torch.as_tensor(gt)),  # float index map + torch
        (onehot_p, onehot_g),  # one-hot numpy / torch
    ]
    for p, g in variants:
        out = case_metrics(p, g, 3)
        for c in (1, 2):
            assert out[c] == pytest.approx(ref[c])
    assert ref[1][0] == pytest.approx(0.75, abs=1e-6)


def test_input_errors():
    with pytest.raises(ValueError):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 2)  # shape mismatch
    with pytest.raises(ValueError):
        to_index_map(np.zeros((3, 4, 4, 4)), num_classes=4)  # channels neither 1 nor C
    with pytest.raises(ValueError):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 1)
    with pytest.raises(ValueError):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 2, spacing=(1.0, 0.0, 1.0))


def test_2d_spatial_dims():
    gt, pred = np.zeros((8, 8), int), np.zeros((8, 8), int)
    gt[1, 1] = 1
    pred[1, 5] = 1
    assert case_metrics(pred, gt, 2, spatial_dims=2, spacing=(1.0, 0.5))[1][1] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- aggregation
def test_aggregation_mean_over_cases_then_classes():
    rows = make_rows("a", {1: (0.8, 2.0), 2: (0.4, 6.0)}) + make_rows("b", {1: (0.6, 4.0), 2: (0.2, 10.0)})
    s = summarize(rows)
    assert [c.class_index for c in s.per_class] == [1, 2]
    assert s.per_class[0].dice == pytest.approx(0.7) and s.per_class[0].hd95 == pytest.approx(3.0)
    assert s.per_class[1].dice == pytest.approx(0.3) and s.per_class[1].hd95 == pytest.approx(8.0)
    assert s.mean_dice == pytest.approx(0.5) and s.mean_hd95 == pytest.approx(5.5)
    assert s.n_cases == 2


def test_aggregation_is_mean_of_class_means_not_of_rows():
    # class 1 in two cases (1.0, 0.0) -> 0.5 ; class 2 in one case 1.0 -> mean of class means 0.75
    # (a pooled mean over the three rows would be 0.667)
    rows = [MetricRow("a", 1, "x", 1.0, 0.0), MetricRow("b", 1, "x", 0.0, 4.0), MetricRow("a", 2, "y", 1.0, 2.0)]
    s = summarize(rows)
    assert s.mean_dice == pytest.approx(0.75)
    assert s.mean_hd95 == pytest.approx((2.0 + 2.0) / 2)
    assert [c.n_cases for c in s.per_class] == [2, 1]


def test_protocol_results_class_names_and_duplicates(tmp_path):
    gt, pred = _vol(), _vol()
    gt[1:5, 1:5, 1:5] = 1
    pred[2:6, 1:5, 1:5] = 1
    res = ProtocolResults(3, class_names=["bg", "liver", "spleen"])
    res.add_case("c", pred, gt)
    res.add_case("c", gt, gt, spacing=(1, 1, 1))
    assert [r.case for r in res.rows] == ["c", "c", "c#2", "c#2"]
    assert [r.class_name for r in res.rows] == ["liver", "spleen"] * 2
    assert [r.hd95_unit for r in res.rows] == ["voxel", "voxel", "mm", "mm"]
    np.testing.assert_allclose(res.dice_matrix(), [[0.75, 0.0], [1.0, 0.0]], atol=1e-6)
    with pytest.warns(UserWarning, match="different units"):
        s = res.write(str(tmp_path))
    assert s.hd95_unit == "mixed"
    assert s.mean_dice == pytest.approx((0.875 + 0.0) / 2, abs=1e-6)


# ----------------------------------------------------------------------------- files
def test_csv_round_trip_and_columns(tmp_path):
    rows = make_rows("case1", {1: (0.123456789012345, 3.5), 2: (1.0, 0.0)}, hd95_unit="mm")
    rows += make_rows("case2", {1: (0.0, 0.0), 2: (2 / 3, 17.25)}, hd95_unit="mm")
    path = tmp_path / "sub" / "per_case.csv"
    write_metrics_csv(rows, str(path), class_names={1: "aorta", 2: "liver"})
    with open(path, newline="") as f:
        raw = list(csv.reader(f))
    assert tuple(raw[0]) == CSV_COLUMNS
    assert raw[1] == ["case1", "1", "aorta", "0.123456789012345", "3.5", "mm"]
    back = read_metrics_csv(str(path))
    assert len(back) == 4
    for a, b in zip(rows, back):
        assert (b.case, b.class_index, b.dice, b.hd95, b.hd95_unit) == (a.case, a.class_index, a.dice, a.hd95, "mm")
    assert [b.class_name for b in back] == ["aorta", "liver", "aorta", "liver"]
    # no temp files left behind
    assert sorted(os.listdir(path.parent)) == ["per_case.csv"]


def test_write_summary_csv_and_markdown(tmp_path):
    rows = make_rows("a", {1: (0.8, 2.0), 2: (0.4, 6.0)}, ["bg", "kidney", "liver"])
    rows += make_rows("b", {1: (0.6, 4.0), 2: (0.2, 10.0)}, ["bg", "kidney", "liver"])
    csv_path = tmp_path / "summary.csv"
    s = write_summary(rows, str(csv_path))
    assert s.mean_dice == pytest.approx(0.5)
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0].keys()) == SUMMARY_COLUMNS
    assert [t["class_name"] for t in table] == ["kidney", "liver", "mean"]
    assert float(table[0]["dice"]) == pytest.approx(0.7) and float(table[1]["hd95"]) == pytest.approx(8.0)
    assert table[2]["class_index"] == "all"
    assert float(table[2]["dice"]) == pytest.approx(0.5) and float(table[2]["hd95"]) == pytest.approx(5.5)
    assert table[2]["n_cases"] == "2"
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | kidney | 70.00 | 3.00 | 2 |" in md
    assert "| 2 | liver | 30.00 | 8.00 | 2 |" in md
    assert "**mean** | **50.00** | **5.50**" in md
    assert "HD95 (voxel)" in md
    # overwrite in place works (atomic replace), no temp files
    write_summary(rows[:2], str(csv_path))
    assert "| 2 | liver | 40.00 | 6.00 | 1 |" in (tmp_path / "summary.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["summary.csv", "summary.md"]


def test_meta_helpers():
    aff = np.diag([0.7, 0.8, 2.5, 1.0])
    aff[:3, :3] = aff[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # permuted axes
    assert spacing_from_meta({"affine": torch.as_tensor(aff)}) == pytest.approx([0.8, 0.7, 2.5])
    assert spacing_from_meta({"pixdim": [1.0, 0.6, 0.6, 3.0, 1, 1, 1, 1]}) == pytest.approx([0.6, 0.6, 3.0])
    assert spacing_from_meta({"filename_or_obj": "x"}) is None
    assert case_name_from_meta({"filename_or_obj": "/d/img0001.nii.gz"}, "z") == "img0001"
    assert case_name_from_meta({"filename_or_obj": "case0008.npy.h5"}, "z") == "case0008"
    assert case_name_from_meta({}, "z") == "z"


# ----------------------------------------------------------------------------- MONAI / ignite
def _handler_cases():
    """Two cases; expected (per class): c1 dice (0, 1) hd (3 vox * 2 mm, 0); c2 dice (1, 0) hd (0, 0)."""
    g1, p1 = _vol(), _vol()
    g1[2, 2, 2] = 1
    p1[2, 2, 5] = 1  # class 1: both single voxels, 3 voxels apart on the z axis (spacing 2 mm)
    g1[6:9, 6:9, 6:9] = 2
    p1[6:9, 6:9, 6:9] = 2  # class 2: identical
    g2, p2 = _vol(), _vol()
    p2[1:3, 1:3, 1:3] = 1  # class 1: pred only -> 1 / 0
    g2[6:9, 6:9, 6:9] = 2  # class 2: GT only -> 0 / 0
    return [("/data/case_a.nii.gz", p1, g1), ("/data/case_b.nii.gz", p2, g2)]


def _check_outputs(out_dir, engine_metrics, unit="mm", hd_a=6.0):
    rows = read_metrics_csv(os.path.join(out_dir, "metrics_per_case.csv"))
    got = [(r.case, r.class_index, r.class_name, round(r.dice, 6), round(r.hd95, 6), r.hd95_unit) for r in rows]
    assert got == [
        ("case_a", 1, "aorta", 0.0, hd_a, unit),
        ("case_a", 2, "liver", 1.0, 0.0, unit),
        ("case_b", 1, "aorta", 1.0, 0.0, unit),
        ("case_b", 2, "liver", 0.0, 0.0, unit),
    ]
    assert os.path.isfile(os.path.join(out_dir, "metrics_summary.csv"))
    assert "**mean** | **50.00** |" in open(os.path.join(out_dir, "metrics_summary.md")).read()
    assert engine_metrics["mean_dice_protocol"] == pytest.approx(0.5)
    assert engine_metrics["mean_hd95_protocol"] == pytest.approx(hd_a / 4)  # ((hd_a+0)/2 + 0) / 2


def test_handler_with_supervised_evaluator(tmp_path):
    from monai.data import DataLoader, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine
    from monai.transforms import AsDiscreted, Compose

    n_cls = 3
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    data = []
    for fn, pred, gt in _handler_cases():
        meta = {"filename_or_obj": fn}
        # the "image" carries the prediction so that an identity-like network reproduces it
        data.append(
            {
                "image": MetaTensor(torch.as_tensor(pred[None], dtype=torch.float32), affine=affine, meta=dict(meta)),
                "label": MetaTensor(torch.as_tensor(gt[None], dtype=torch.float32), affine=affine, meta=dict(meta)),
            }
        )

    class OneHotNet(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), n_cls).permute(0, 4, 1, 2, 3).float()

    post = Compose(
        [AsDiscreted(keys="pred", argmax=True), AsDiscreted(keys="label", to_onehot=n_cls)]
    )  # pred: (1, H, W, D) index map ; label: (C, H, W, D) one-hot
    handler = ProtocolMetricHandler(
        num_classes=n_cls, output_dir=str(tmp_path / "eval"), class_names=["bg", "aorta", "liver"], use_spacing=True
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=1),
        network=OneHotNet(),
        postprocessing=post,
        key_val_metric={
            "val_dice": MeanDiceProtocol(num_classes=n_cls, output_transform=from_engine(["pred", "label"]))
        },
        val_handlers=[handler],
    )
    evaluator.run()
    _check_outputs(str(tmp_path / "eval"), evaluator.state.metrics)
    assert evaluator.state.metrics["val_dice"] == pytest.approx(0.5)
    details = evaluator.state.metric_details["mean_dice_protocol"]
    np.testing.assert_allclose(details.numpy(), [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(evaluator.state.metric_details["val_dice"].numpy(), details.numpy(), atol=1e-6)
    assert handler.last_summary is not None and handler.last_summary.hd95_unit == "mm"


class _State:
    def __init__(self):
        self.metrics = {}
        self.output = None
        self.batch = None


class _FakeEngine:
    def __init__(self):
        self.state = _State()


def test_handler_fake_engine_meta_dicts_and_voxels(tmp_path):
    """Plain tensors (no MetaTensor): names/spacing come from `*_meta_dict` entries of the batch."""
    n_cls = 3
    handler = ProtocolMetricHandler(
        num_classes=n_cls, output_dir=str(tmp_path), class_names={1: "aorta", 2: "liver"}, use_spacing=True
    )
    eng = _FakeEngine()
    handler.epoch_started(eng)
    for fn, pred, gt in _handler_cases():
        eng.state.output = [{"pred": torch.as_tensor(pred[None]), "label": torch.as_tensor(gt[None])}]
        eng.state.batch = [{"label_meta_dict": {"filename_or_obj": fn, "pixdim": [1, 1.0, 1.0, 2.0, 1, 1, 1, 1]}}]
        handler.iteration_completed(eng)
    handler.epoch_completed(eng)
    _check_outputs(str(tmp_path), eng.state.metrics)

    # voxel units without spacing; a new epoch resets the rows; no names -> case_0000, ...
    h2 = ProtocolMetricHandler(
        num_classes=n_cls, output_dir=str(tmp_path / "vox"), class_names=["bg", "aorta", "liver"]
    )
    h2.epoch_started(eng)
    for _, pred, gt in _handler_cases():
        eng.state.output = [{"pred": torch.as_tensor(pred[None]), "label": torch.as_tensor(gt[None])}]
        eng.state.batch = None
        h2.iteration_completed(eng)
    h2.epoch_completed(eng)
    rows = read_metrics_csv(str(tmp_path / "vox" / "metrics_per_case.csv"))
    assert [r.case for r in rows] == ["case_0000"] * 2 + ["case_0001"] * 2
    assert rows[0].hd95 == pytest.approx(3.0) and rows[0].hd95_unit == "voxel"
    assert eng.state.metrics["mean_hd95_protocol"] == pytest.approx(0.75)


def test_handler_use_spacing_without_meta_raises(tmp_path):
    handler = ProtocolMetricHandler(num_classes=2, output_dir=str(tmp_path), use_spacing=True)
    eng = _FakeEngine()
    eng.state.output = [{"pred": torch.zeros(1, 4, 4, 4), "label": torch.zeros(1, 4, 4, 4)}]
    with pytest.raises(ValueError, match="use_spacing"):
        handler.iteration_completed(eng)


def test_protocol_metric_cumulative():
    cases = _handler_cases()
    m = ProtocolMetric(num_classes=3)
    # batch-first tensors (B=1) and list of channel-first tensors
    m(torch.as_tensor(cases[0][1][None, None]), torch.as_tensor(cases[0][2][None, None]))
    m([torch.as_tensor(cases[1][1][None])], [torch.as_tensor(cases[1][2][None])])
    assert m.aggregate().item() == pytest.approx(0.5)
    np.testing.assert_allclose(m.aggregate("mean_batch").numpy(), [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(m.aggregate("none").numpy(), [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)
    h = ProtocolMetric(num_classes=3, metric="hd95", spacing=(1.0, 1.0, 2.0))
    h(torch.as_tensor(cases[0][1][None, None]), torch.as_tensor(cases[0][2][None, None]))
    np.testing.assert_allclose(h.aggregate("none").numpy(), [[6.0, 0.0]], atol=1e-5)
