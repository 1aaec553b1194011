"""End-to-end tests of the MONAI Bundle in ``bundle/`` (CPU, tiny network, tiny data).

* ``slow`` tests run the documented commands (``python -m monai.bundle run training|evaluating|...``)
  in subprocesses, in this order: train 1 epoch -> evaluate that model -> infer with that model on the
  real CT (when ../shared is present) and on synthetic volumes in non-RAS orientations.
* The other tests run in-process: the metadata against the bundle spec, the configs against each
  other, ``verify_net_in_out``, ``ckpt_export`` (traced TorchScript == eager),
  ``ConfigWorkflow.check_properties`` and a voxel-exact orientation round trip of inference.json.

Every run writes under pytest's tmp folder (``bundle_root``/``dataset_dir``/``output_dir`` overridden);
the configs are read from the repo.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TINY_BUNDLE as TINY, BackgroundRun, axcodes_affine, intensity_coded_inference
from fias_monai.data import load_datalist, make_demo_dataset
from fias_monai.losses import FeatureMixingLoss

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN, EVALUATE, INFER = CONFIGS / "train.json", CONFIGS / "evaluate.json", CONFIGS / "inference.json"
META, LOGGING_CONF = CONFIGS / "metadata.json", CONFIGS / "logging.conf"
REAL_CT = REPO.parent / "shared" / "data" / "totalseg_ct" / "example_ct_sm.nii.gz"

def _json(path: Path):
    return json.loads(Path(path).read_text())


def _cli_overrides(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _tiny_parser(*files: Path, overrides: dict | None = None):
    """A ConfigParser of ``files`` (in order) with the tiny network and ``overrides`` on top."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({**{k: v for k, v in TINY.items() if k.startswith("network_def")}, **(overrides or {})})
    return parser


def _bundle(*args: str, overrides: dict, timeout: float = 400) -> BackgroundRun:
    """``python -m monai.bundle ARGS --key value ...`` from the repo root, started now in the background
    (one torch thread: the slow tests run two at a time on the 2 cores); its ``result()`` waits for it and
    fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return BackgroundRun([sys.executable, "-m", "monai.bundle", *args, *_cli_overrides(overrides)], cwd=REPO,
                         env=env, timeout=timeout, check=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def restore_logging():
    """ConfigWorkflow(logging_file=...) re-configures the root logger (handlers on sys.stdout): undo it."""
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    yield
    for h in root.handlers[:]:
        if h not in saved[1]:
            root.removeHandler(h)
    for h in saved[1]:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(saved[0])


# ----------------------------------------------------------------------------------------------------
# metadata and configs (fast)


def test_metadata_has_every_mandatory_field():
    meta = _json(META)
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert key in meta and meta[key] not in ("", None, {}, []), f"metadata.json: {key} missing or empty"
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
                "copyright"):
        assert isinstance(meta[key], str), key
    assert meta["version"] in meta["changelog"], "the changelog must describe the current version"
    assert isinstance(meta["required_packages_version"], dict)
    fmt = meta["network_data_format"]
    assert fmt.get("inputs") and fmt.get("outputs")
    for section in ("inputs", "outputs"):
        for name, spec in fmt[section].items():
            for key in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "channel_def"):
                assert key in spec, f"network_data_format.{section}.{name}: {key} missing"
            assert len(spec["channel_def"]) == spec["num_channels"], f"{section}.{name}: channel_def vs num_channels"
            assert sorted(spec["channel_def"], key=int) == [str(i) for i in range(spec["num_channels"])]
            # the network takes 2D slices whose sides divide by 32
            assert len(spec["spatial_shape"]) == 2
            assert all(isinstance(s, str) or s % 32 == 0 for s in spec["spatial_shape"])
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    assert fmt["inputs"]["image"]["num_channels"] == parser.get_parsed_content("network_def#in_channels") == 1


def test_configs_agree_with_each_other_and_with_metadata():
    train, infer, meta = _json(TRAIN), _json(INFER), _json(META)
    class_names = train["class_names"]
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channel_def == {str(i): name for i, name in enumerate(class_names)}, (
        "metadata.json outputs.pred.channel_def must name every class of train.json's class_names"
    )
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(class_names)
    assert infer["class_names"] == class_names
    # the model.pt that training writes must load (strict) into inference.json's network
    ignore = ("pretrained_encoder",)  # an initialisation detail of training
    assert {k: v for k, v in infer["network_def"].items() if k not in ignore} == {
        k: v for k, v in train["network_def"].items() if k not in ignore
    }
    assert infer["image_size"] == train["image_size"]
    assert infer["in_channels"] == train["in_channels"] and infer["context_slices"] == train["context_slices"]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == train["image_size"]


def _acdc_slice_transforms(intensity_augmentation: bool):
    """train.json + acdc.json: the volume intensity scaling and the per-slice augmentation."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(TRAIN.parent / "acdc.json")])
    if not intensity_augmentation:
        parser["intensity_augmentation"]["transforms"] = []
    return parser.get_parsed_content("intensity_transform"), parser.get_parsed_content("train#preprocessing")


def test_acdc_intensity_scaling_ignores_a_few_bright_voxels():
    # patient021's case: a volume whose min-max range is set by a few bright voxels (here 0.05 % at 10x the
    # tissue) must come out like the same volume without them, not ten times darker
    scale, _ = _acdc_slice_transforms(False)
    rng = np.random.default_rng(0)
    tissue = rng.uniform(0.0, 0.1, size=(1, 64, 64, 8)).astype(np.float32)
    tissue[:, 24:40, 24:40] += 0.3  # a bright "blood pool"
    outliers = tissue.copy()
    outliers.reshape(-1)[rng.choice(tissue.size, 16, replace=False)] = 4.0
    clean, spiked = (scale({"image": torch.from_numpy(v)})["image"] for v in (tissue, outliers))
    pool = (slice(None), slice(26, 38), slice(26, 38))
    assert float(clean.min()) == 0.0 and float(clean.max()) == 1.0
    assert float(spiked[pool].mean()) == pytest.approx(float(clean[pool].mean()), abs=0.02)
    assert float(spiked[pool].mean()) > 0.8  # min-max scaling would leave it at about 0.1


def test_acdc_intensity_augmentation_changes_the_image_only():
    _, augment = _acdc_slice_transforms(True)
    _, plain = _acdc_slice_transforms(False)
    image = torch.rand(1, 32, 32)
    label = (image > 0.5).long()
    changed = 0
    for seed in range(20):
        augment.set_random_state(seed)
        plain.set_random_state(seed)
        a, p = (t({"image": image.clone(), "label": label.clone()}) for t in (augment, plain))
        assert torch.equal(a["label"], p["label"])  # same geometry: the intensity steps touch no label
        changed += not torch.allclose(a["image"], p["image"])
    assert 5 <= changed <= 15  # each of the three steps fires with p 0.15-0.3: about half the slices change


def test_acdc_12min_recipe_reaches_training_evaluation_and_inference():
    """acdc_12min.json sets only keys train.json + acdc.json have (a misspelt key would silently do nothing);
    the training it describes is the measured one; the model it trains loads (strict) into inference.json and
    evaluate.json with it and gives the same output there, while inference.json without it cannot load that
    model."""
    acdc, recipe_file = CONFIGS / "acdc.json", CONFIGS / "acdc_12min.json"
    base = _tiny_parser(TRAIN, acdc)
    recipe = {k: v for k, v in _json(recipe_file).items() if not k.startswith("_desc")}
    assert [k for k in recipe if k not in base] == []
    assert base.get_parsed_content("max_minutes") == 7.5  # the time target's recipe, unchanged

    train = _tiny_parser(TRAIN, acdc, recipe_file)
    assert [train.get_parsed_content(k) for k in ("max_minutes", "max_grad_norm", "end_slice_weight")] == [12, 1.0, 2]
    torch.manual_seed(0)
    net = train.get_parsed_content("network_def").eval()
    assert net.full_res_head is not None and net.inference_heads == (0,)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = net(x)
    for files in ((INFER, acdc, recipe_file), (TRAIN, acdc, recipe_file, EVALUATE)):
        other = _tiny_parser(*files).get_parsed_content("network_def").eval()
        other.load_state_dict(net.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(other(x), expected), files
    with pytest.raises(RuntimeError, match="full_res_head"):
        _tiny_parser(INFER, acdc).get_parsed_content("network_def").load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("keep", [False, True])
def test_largest_component_postprocessing_is_one_switch_for_validation_evaluation_and_inference(keep):
    from monai.bundle import ConfigParser

    pipelines = {"validation": ([TRAIN, CONFIGS / "acdc.json"], "validate#postprocessing"),
                 "evaluation": ([TRAIN, CONFIGS / "acdc.json", EVALUATE], "validate#postprocessing"),
                 "inference": ([INFER, CONFIGS / "acdc.json"], "postprocessing")}
    # a 3D prediction: a large LV (3) with a stray 8-voxel LV island, an RV (1) in two equal-sized
    # pieces, MYO (2) absent
    pred = torch.zeros(1, 32, 32, 6, dtype=torch.uint8)
    pred[0, 8:20, 8:20, 1:5] = 3
    pred[0, 28:30, 28:30, 2:4] = 3
    pred[0, 0:4, 24:28, 0:2] = 1
    pred[0, 0:4, 24:28, 4:6] = 1
    for name, (configs, key) in pipelines.items():
        parser = ConfigParser()
        parser.read_config([str(c) for c in configs])
        parser.update({"keep_largest_component": keep})
        steps = parser.get_parsed_content(key).transforms
        kinds = [type(t).__name__ for t in steps]
        last_inversion = max(i for i, k in enumerate(kinds) if k.endswith("Invertd"))
        assert kinds[last_inversion + 1] == ("KeepLargestConnectedComponentd" if keep else "Identityd"), name
    out = parser.get_parsed_content("largest_component")({"pred": pred.clone()})["pred"]
    if not keep:
        assert torch.equal(out, pred)
        return
    assert int((out == 3).sum()) == 12 * 12 * 4  # the island is gone, the LV kept whole
    assert int((out == 1).sum()) == 4 * 4 * 2  # one of the two RV pieces is kept
    assert int((out == 0).sum()) == pred.numel() - 12 * 12 * 4 - 4 * 4 * 2  # removed voxels become background


@pytest.mark.parametrize("configs, key", [([TRAIN], "validate#postprocessing"),
                                          ([TRAIN, EVALUATE], "validate#postprocessing")])
def test_a_prediction_equal_to_the_training_target_maps_back_to_the_label_exactly(tmp_path, configs, key):
    """The training target (label resized to 256x256) taken as the prediction and sent through the
    protocol's postprocessing gives back the scan's label voxel for voxel, on a grid that is resized
    (216 x 200 -> 256 x 256) and reoriented (LPS -> RAS). With PyTorch's "nearest" (floor) for the label
    resize and the inversion, up to one pixel of every structure moved: ACDC's Dice was capped at 93.8."""
    from monai.bundle import ConfigParser
    from monai.transforms import Invertd

    rng = np.random.default_rng(0)
    label = np.zeros((216, 200, 4), np.uint8)
    yy, xx = np.mgrid[:216, :200]
    for z in range(4):  # a ring (thin, like the myocardium), a disc inside it and a blob beside
        r = np.hypot(yy - 100 - 3 * z, xx - 90)
        label[..., z][(r > 22) & (r < 27)] = 2
        label[..., z][r <= 22] = 3
        label[..., z][(np.abs(yy - 100) < 15) & (np.abs(xx - 140 - z) < 9)] = 1
    image = (label * 40 + rng.normal(0, 5, label.shape)).astype(np.float32)
    affine = np.diag([-1.5, -1.5, 8.0, 1.0])  # LPS
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "lab.nii.gz"))
    case = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    target = parser.get_parsed_content("train#volume_transforms")(dict(case))["label"]  # 1, 256, 256, 4 (RAS)
    assert tuple(target.shape) == (1, 256, 256, 4)
    data = parser.get_parsed_content("validate#preprocessing")(dict(case))
    data["pred"] = torch.nn.functional.one_hot(target[0].long(), 4).permute(3, 0, 1, 2).float()
    post = parser.get_parsed_content(key)
    pred = post(data)["pred"]
    assert pred.shape[1:] == label.shape
    assert np.array_equal(np.asarray(pred[0]), label)  # exact, ring included

    # the old inversion (MONAI's Invertd with nearest_interp, PyTorch "nearest") moves voxels
    data = parser.get_parsed_content("validate#preprocessing")(dict(case))
    data["pred"] = torch.nn.functional.one_hot(target[0].long(), 4).permute(3, 0, 1, 2).argmax(0, keepdim=True)
    old = Invertd("pred", parser.get_parsed_content("validate#preprocessing"), "image", nearest_interp=True)(data)
    assert not np.array_equal(np.asarray(old["pred"][0]), label)


@pytest.mark.parametrize("value, channels_last", [("false", False), ("true", True), (False, False), (True, True)])
def test_channels_last_switch_takes_the_cli_strings(value, channels_last):
    # python-fire passes --channels_last false as the string "false", which plain truthiness reads as on
    parser = _tiny_parser(TRAIN, overrides={"channels_last": value})
    weight = parser.get_parsed_content("network").encoder.stem[1].conv.weight  # (32, 16, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert weight.is_contiguous() is not channels_last


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    from monai.bundle import ConfigParser

    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 4))  # 8 slices: 4 batches
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({**TINY, "dataset_dir": str(tmp_path / "demo"), "batch_size": 2, "epochs": 5,
                   "warmup_epochs": 1, "learning_rate": 1e-3, "min_lr_ratio": 0.01, "num_workers": 0,
                   "cache_workers": 1, "device": "$torch.device('cpu')", "cuda_graph": False})
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert len(parser.get_parsed_content("train#dataloader")) == 4
    lrs = []
    for _ in range(20):  # 5 epochs of 4 iterations, as LrScheduleHandler steps it
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up over the first epoch
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then only down
    assert lrs[12] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 8 / 16)))  # cosine over the other 16
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-5)  # ends at lr * min_lr_ratio


@pytest.mark.parametrize("weight", [1, 3])
def test_end_slice_weight_reaches_the_training_loader(tmp_path, weight):
    from monai.bundle import ConfigParser
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 4))  # 8 slices
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({**TINY, "dataset_dir": str(tmp_path / "demo"), "batch_size": 2, "num_workers": 0,
                   "cache_workers": 1, "end_slice_weight": weight})
    loader = parser.get_parsed_content("train#dataloader")
    assert len(loader) == 4  # the same epoch length either way
    if weight == 1:
        assert isinstance(loader.sampler, RandomSampler)  # shuffled, as before the switch
    else:
        dataset = parser.get_parsed_content("train#dataset")
        assert isinstance(loader.sampler, WeightedRandomSampler)
        assert loader.sampler.weights.tolist() == dataset.sampling_weights(3).tolist()
        assert 3.0 in loader.sampler.weights.tolist()


@pytest.mark.parametrize("border_weight", [0, 2.0])
def test_border_weight_reaches_the_trainers_loss(border_weight):
    parser = _tiny_parser(TRAIN, overrides={"border_weight": border_weight})
    loss = parser.get_parsed_content("train#trainer#loss_function", instantiate=True)
    assert (loss.border_weight, loss.border_width) == (border_weight, 1)
    y = torch.zeros(1, 1, 8, 8)
    y[..., 2:6, 2:6] = 1
    logits = torch.zeros(1, parser.get_parsed_content("num_classes"), 8, 8)
    # uniform logits: every voxel's cross-entropy is log(C), and border voxels count 1 + border_weight times
    ce = 0.6 * np.log(logits.shape[1]) * (1 + border_weight * (32 / 64))  # 32 of the 64 voxels are border
    dice = FeatureMixingLoss(lambda_dice=1.0, lambda_ce=0.0)(logits, y).item()
    assert loss(logits, y).item() == pytest.approx(0.4 * dice + ce, rel=1e-6)


@pytest.mark.parametrize("decay", [0, 0.5])
def test_ema_decay_wires_validation_and_the_saved_model_to_the_weight_average(tmp_path, restore_logging, decay):
    from monai.bundle import ConfigParser, ConfigWorkflow

    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 4))
    overrides = {**TINY, "dataset_dir": str(tmp_path / "demo"), "bundle_root": str(tmp_path / "bundle"),
                 "batch_size": 2, "epochs": 1, "num_workers": 0, "cache_workers": 1, "learning_rate": 1e-2,
                 "ema_decay": decay, "device": "$torch.device('cpu')", "cuda_graph": False}
    wf = ConfigWorkflow(config_file=str(TRAIN), meta_file=str(META), logging_file=False, workflow_type="train",
                        **overrides)
    wf.initialize()
    network, averaged = wf.parser.get_parsed_content("network"), wf.parser.get_parsed_content("eval_network")
    assert wf.parser.get_parsed_content("validate#evaluator").network is averaged
    assert wf.parser.get_parsed_content("train#handlers")[0].averaged is averaged
    assert (averaged is network) == (decay == 0)
    wf.run()
    wf.finalize()
    models = tmp_path / "bundle" / "models"
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    last = torch.load(models / "last.pt", map_location="cpu", weights_only=False)
    # models/model.pt is what validation scored: the average with ema_decay, else the trained weights
    for key, value in averaged.state_dict().items():
        assert torch.equal(best[key], value), key
    assert ("ema" in last) == (decay > 0)
    trained_differs = any(not torch.equal(v, network.state_dict()[k]) for k, v in best.items() if v.is_floating_point())
    assert trained_differs == (decay > 0)  # 4 steps at lr 1e-2: the average trails the trained weights
    if decay:
        assert all(torch.equal(last["ema"][k], v) for k, v in best.items())
        assert all(torch.equal(last["model"][k], v) for k, v in network.state_dict().items())
    # evaluation loads models/model.pt into the network it runs, with or without ema_decay in the overrides
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(EVALUATE)])
    parser.update(overrides)
    evaluator = parser.get_parsed_content("validate#evaluator")
    loader = parser.get_parsed_content("validate#handlers")[0]
    assert evaluator.network is parser.get_parsed_content("network") is loader.load_dict["model"]


def test_ema_decay_survives_monai_label_inserting_its_checkpoint_loader(tmp_path):
    # MONAI Label's BundleTrainTask inserts a CheckpointLoader at train#handlers[0] when models/model.pt
    # exists: nothing may refer to the weight average by its place in that list
    from monai.bundle import ConfigParser

    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 4))
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    handlers = parser.get("train#handlers")
    handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(tmp_path / "model.pt"),
                        "load_dict": {"model": "$@network"}, "strict": False})
    parser.update({**TINY, "dataset_dir": str(tmp_path / "demo"), "bundle_root": str(tmp_path / "bundle"),
                   "num_workers": 0, "cache_workers": 1, "ema_decay": 0.999, "device": "$torch.device('cpu')",
                   "cuda_graph": False, "train#handlers": handlers})
    trainer = parser.get_parsed_content("train#trainer")
    averaged, network = parser.get_parsed_content("averaged_network"), parser.get_parsed_content("network")
    assert averaged is not network
    assert parser.get_parsed_content("validate#evaluator").network is averaged
    assert parser.get_parsed_content("best_model_saver").network is averaged
    [average] = [h for h in parser.get_parsed_content("train#handlers") if type(h).__name__ == "WeightAverageHandler"]
    assert average.averaged is averaged and average.network is network and trainer.network is network


def test_one_training_clock_for_the_time_budget_the_curve_and_last_pt(tmp_path):
    # the time trained must be the same object in the three places, or a resumed run's budget or curve restarts
    from monai.bundle import ConfigParser

    from fias_monai.handlers import LastCheckpointHandler, MetricHistoryHandler, TimeBudgetHandler

    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, shape=(64, 64, 4))
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({**TINY, "dataset_dir": str(tmp_path / "demo"), "bundle_root": str(tmp_path / "bundle"),
                   "num_workers": 0, "cache_workers": 1, "max_minutes": 5, "device": "$torch.device('cpu')",
                   "cuda_graph": False})
    handlers = parser.get_parsed_content("train#handlers")
    clock = parser.get_parsed_content("training_clock")
    [budget] = [h for h in handlers if isinstance(h, TimeBudgetHandler)]
    [history] = [h for h in handlers if isinstance(h, MetricHistoryHandler)]
    [last] = [h for h in handlers if isinstance(h, LastCheckpointHandler)]
    assert budget.clock is clock and history.clock is clock and last.save_dict["training_clock"] is clock
    assert last.optional_keys == {"training_clock"}


def test_evaluating_weights_of_another_network_names_the_file_and_what_differs(tmp_path):
    """A model of acdc_12min.json (full-resolution head) evaluated without that overlay: evaluate.json's loader
    fails with one line naming the file, the modules and shapes that differ, and the overlay to add, and
    PyTorch's key-by-key list is not chained under it. (MONAI's plain CheckpointLoader named no file.)"""
    from monai.bundle import run

    from fias_monai import FIAS
    from fias_monai.handlers import WeightsLoadError

    make_demo_dataset(tmp_path / "demo", num_train=1, num_val=1, shape=(64, 64, 4))
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    weights = tmp_path / "bundle" / "models" / "model.pt"
    net = FIAS(1, 4, embed_dims=tuple(TINY["network_def#embed_dims"]), depths=tuple(TINY["network_def#depths"]),
               full_res_head=True)
    torch.save(net.state_dict(), weights)
    with pytest.raises(RuntimeError) as info:
        run("evaluating", config_file=[str(TRAIN), str(EVALUATE)], **TINY, bundle_root=str(tmp_path / "bundle"),
            dataset_dir=str(tmp_path / "demo"), num_workers=0, cache_workers=1)
    error = info.value
    while error is not None and not isinstance(error, WeightsLoadError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"no WeightsLoadError under {info.value!r}"
    assert str(error).startswith(f"cannot load the model weights {weights}: they do not fit the configured network")
    assert "full_res_head.* (" in str(error) and "acdc_12min.json" in str(error)
    assert error.__cause__ is None and error.__suppress_context__
    assert not (tmp_path / "bundle" / "eval" / "metrics_summary.json").exists()


# ----------------------------------------------------------------------------------------------------
# MONAI bundle tooling, in-process (fast)


def _random_checkpoint(path: Path) -> torch.nn.Module:
    """Instantiate inference.json's network_def (tiny) and save its random weights as a state dict."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(INFER))
    parser.update(TINY)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), path)
    return net


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    # The metadata's 256x256 input, 1 channel float32 -> 4 channels float32 (eval mode: one tensor).
    verify_net_in_out("network_def", meta_file=str(META), config_file=str(INFER), device="cpu", n=2, **TINY)


def test_ckpt_export_traced_torchscript_matches_eager(tmp_path):
    from monai.bundle import ckpt_export

    net = _random_checkpoint(tmp_path / "model.pt").eval()
    ts_path = tmp_path / "model.ts"
    # FIAS is traced, not scripted (train mode returns a list, eval mode one tensor).
    ckpt_export("network_def", filepath=str(ts_path), ckpt_file=str(tmp_path / "model.pt"), meta_file=str(META),
                config_file=str(INFER), use_trace=True, input_shape=[1, 1, 64, 64], **TINY)
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == _json(META)["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "fias_monai.networks.FIAS"
    torch.manual_seed(1)
    for shape in ((1, 1, 64, 64), (2, 1, 96, 128)):  # the trace must not bake in the example's size
        x = torch.rand(shape)
        with torch.no_grad():
            eager, traced = net(x), ts(x)
        assert traced.shape == (shape[0], 4, *shape[2:])
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config_file, workflow_type",
    [(TRAIN, "train"), (INFER, "infer")],
    ids=["train.json", "inference.json"],
)
def test_config_workflow_check_properties(tmp_path, restore_logging, config_file, workflow_type):
    from monai.bundle import ConfigWorkflow

    demo = tmp_path / "demo"
    make_demo_dataset(demo, num_train=2, num_val=1, shape=(64, 64, 4))
    overrides = {**TINY, "bundle_root": str(tmp_path / "bundle"), "num_workers": 0}
    if workflow_type == "train":
        overrides.update(dataset_dir=str(demo), cache_workers=1)
    else:
        overrides.update(dataset_dir=str(demo / "imagesTr"), output_dir=str(tmp_path / "out"))
    wf = ConfigWorkflow(config_file=str(config_file), meta_file=str(META), logging_file=str(LOGGING_CONF),
                        workflow_type=workflow_type, **overrides)
    wf.initialize()
    missing = wf.check_properties()
    assert not missing, f"{config_file.name}: required properties missing or optional ones with a wrong ID: {missing}"
    assert wf.bundle_root == str(tmp_path / "bundle")
    assert isinstance(wf.network_def, torch.nn.Module)
    if workflow_type == "train":
        assert wf.max_epochs == _json(TRAIN)["epochs"]
        assert len(wf.train_dataset_data) == 2 and len(wf.val_dataset_data) == 1
    else:
        assert len(wf.dataset_data) == 3


def test_inference_orientation_round_trip_is_voxel_exact(tmp_path):
    """inference.json with a stand-in "network" whose argmax is a known function of the intensity: on
    inputs in non-RAS orientations the written segmentation must be that function of each voxel, in
    the input's own voxel order (a header-only check cannot see a missing flip or transpose)."""
    cases = {"lpi": ("LPI", (64, 64, 5)), "psr": ("PSR", (64, 3, 64)), "ras": ("RAS", (64, 64, 2))}
    for name, (seg, affine, pred) in intensity_coded_inference(tmp_path, INFER, META, cases).items():
        assert nib.aff2axcodes(pred.affine) == tuple(cases[name][0])
        np.testing.assert_allclose(pred.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(pred.dataobj), seg, err_msg=f"{name}: voxels misplaced")


# ----------------------------------------------------------------------------------------------------
# the documented commands, in subprocesses (slow): train -> evaluate -> infer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle_e2e")
    make_demo_dataset(root / "demo", num_train=2, num_val=1, shape=(64, 64, 4))
    watched = [p for d in ("bundle/models", "demo_data") for p in sorted((REPO / d).rglob("*")) if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in watched}
    absent = [d for d in ("eval", "logs", "output") if not (REPO / "bundle" / d).exists()]
    yield root
    # the runs wrote under tmp only: the repo's shipped weights and demo data are untouched
    assert {p: p.stat().st_mtime_ns for p in watched if p.exists()} == before, "a bundle test wrote into the repo"
    assert not [d for d in absent if (REPO / "bundle" / d).exists()], "a bundle test wrote into the repo's bundle/"


def _train(bundle_root: Path, workdir: Path, **overrides) -> BackgroundRun:
    return _bundle("run", "training", "--config_file", str(TRAIN),
                   overrides={**TINY, "epochs": 1, "batch_size": 2, "num_workers": 0, "cache_workers": 1,
                              "bundle_root": str(bundle_root), "dataset_dir": str(workdir / "demo"), **overrides})


@pytest.fixture(scope="module")
def trainings(workdir):
    """The two trainings, side by side: the one the later runs use, and one diverging (lr 1e30, 3 epochs)."""
    runs = {"trained": _train(workdir / "bundle", workdir),
            "diverged": _train(workdir / "diverged", workdir, epochs=3, learning_rate=1e30)}
    yield runs
    for run in runs.values():
        run.stop()


@pytest.fixture(scope="module")
def trained(workdir, trainings):
    trainings["trained"].result()
    return workdir / "bundle"


@pytest.fixture(scope="module")
def model_runs(workdir, trained) -> dict:
    """Evaluation and inference of the trained model, side by side. Inference runs over: the real CT
    (linked, when present) and synthetic volumes saved LPI and PSR with non-unit spacing and a non-zero
    origin."""
    evaluating = _bundle("run", "evaluating", "--config_file", json.dumps([str(TRAIN), str(EVALUATE)]),
                         overrides={**TINY, "num_workers": 0, "cache_workers": 1, "bundle_root": str(trained),
                                    "dataset_dir": str(workdir / "demo")})
    inp, out = workdir / "infer_in", workdir / "infer_out"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for name, codes, shape in (("synth_lpi", "LPI", (40, 56, 7)), ("synth_psr", "PSR", (48, 6, 36))):
        image = (rng.normal(40.0, 300.0, size=shape)).astype(np.float32)
        affine = axcodes_affine(codes, (0.9, 1.6, 3.0), (-101.5, 37.25, 12.0))
        nib.save(nib.Nifti1Image(image, affine), str(inp / f"{name}.nii.gz"))
        assert "".join(nib.aff2axcodes(nib.load(str(inp / f"{name}.nii.gz")).affine)) == codes
    if REAL_CT.is_file():
        os.symlink(REAL_CT, inp / REAL_CT.name)  # read in place: the real file must stay untouched
    hashes = {p.name: _sha256(p) for p in inp.iterdir()}
    inference = _bundle("run", "--config_file", str(INFER),
                        overrides={**TINY, "num_workers": 0, "bundle_root": str(trained), "dataset_dir": str(inp),
                                   "output_dir": str(out)})
    yield {"evaluating": evaluating, "inference": (inference, inp, out, hashes)}
    evaluating.stop()
    inference.stop()


@pytest.fixture(scope="module")
def evaluated(trained, model_runs):
    return trained / "eval", model_runs["evaluating"].result()


@pytest.fixture(scope="module")
def inferred(model_runs):
    inference, inp, out, hashes = model_runs["inference"]
    return inp, out, hashes, inference.result()


@pytest.mark.slow
def test_a_diverging_training_stops_at_the_first_nan_loss(trainings):
    # a learning rate of 1e30 sends the weights to inf after the first step: the run must stop there,
    # not train on for the rest of its epochs
    proc = trainings["diverged"].result()
    log = proc.stdout + proc.stderr
    assert "contains NaN or Inf. Stop training" in log
    assert "Epoch[2]" not in log and "Epoch[3]" not in log  # stopped inside epoch 1


@pytest.mark.slow
def test_train_writes_checkpoints_and_logs(trained):
    from fias_monai.networks import FIAS

    model, last = trained / "models" / "model.pt", trained / "models" / "last.pt"
    assert model.is_file() and last.is_file()
    net = FIAS(1, 4, "tiny", embed_dims=TINY["network_def#embed_dims"], depths=TINY["network_def#depths"])
    net.load_state_dict(torch.load(model, map_location="cpu", weights_only=True), strict=True)
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "best", "trainer"} <= set(state)
    assert state["trainer"]["epoch"] == 1 and state["best"]["best_epoch"] == 1
    log_dir = trained / "logs"
    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {log_dir}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train_loss", "val_mean_dice"} <= tags, tags
    lines = (log_dir / "val_history.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["epoch", "time_s", "val_mean_dice"]
    assert len(lines) == 2 and lines[1].split(",")[0] == "1"
    assert 0.0 <= float(lines[1].split(",")[2]) <= 1.0


@pytest.mark.slow
def test_evaluate_writes_metrics_and_overlays(workdir, evaluated):
    eval_dir, proc = evaluated
    assert f"Restored all variables from {workdir / 'bundle' / 'models' / 'model.pt'}" in proc.stdout + proc.stderr
    class_names = _json(TRAIN)["class_names"]
    val = load_datalist(workdir / "demo" / "datalist.json", "validation")
    cases = [Path(e["label"]).name.split(".")[0] for e in val]
    with open(eval_dir / "metrics_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["case"], int(r["class_index"]), r["class_name"]) for r in rows} == {
        (c, i, class_names[i]) for c in cases for i in range(1, len(class_names))
    }
    assert len(rows) == len(cases) * (len(class_names) - 1)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and float(r["hd95"]) >= 0.0
    with open(eval_dir / "metrics_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [s["class_name"] for s in summary] == class_names[1:] + ["mean"]
    md = (eval_dir / "metrics_summary.md").read_text()
    assert "**mean**" in md and all(name in md for name in class_names[1:])
    pngs = sorted((eval_dir / "overlays").glob("*.png"))
    assert pngs and all(p.name.startswith(tuple(cases)) for p in pngs), pngs
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 100


def _check_prediction(src: Path, pred_path: Path, num_classes: int) -> None:
    img, pred = nib.load(str(src)), nib.load(str(pred_path))
    assert pred.shape == img.shape, (pred.shape, img.shape)
    np.testing.assert_allclose(pred.affine, img.affine, atol=1e-4)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(img.affine)
    assert pred.get_data_dtype() == np.uint8
    values = np.unique(np.asanyarray(pred.dataobj))
    assert set(values.tolist()) <= set(range(num_classes)), values


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CT.is_file(), reason=f"{REAL_CT} is not present (clones lack ../shared)")
def test_inference_on_real_ct(inferred):
    inp, out, hashes, _ = inferred
    src = inp / REAL_CT.name
    _check_prediction(src, out / "example_ct_sm_seg.nii.gz", len(_json(INFER)["class_names"]))
    img = nib.load(str(REAL_CT))
    assert img.shape == (122, 101, 30) and "".join(nib.aff2axcodes(img.affine)) == "RAS"
    assert _sha256(REAL_CT) == hashes[REAL_CT.name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["synth_lpi", "synth_psr"])
def test_inference_keeps_non_ras_geometry(inferred, name):
    inp, out, hashes, _ = inferred
    _check_prediction(inp / f"{name}.nii.gz", out / f"{name}_seg.nii.gz", len(_json(INFER)["class_names"]))


@pytest.mark.slow
def test_inference_leaves_its_inputs_alone(inferred):
    inp, out, hashes, _ = inferred
    assert {p.name: _sha256(p) for p in inp.iterdir()} == hashes  # byte-identical, nothing added
    assert sorted(p.name for p in out.iterdir()) == sorted(
        n.replace(".nii.gz", "_seg.nii.gz") for n in hashes
    )


# ----------------------------------------------------------------------------------------------------
# scripts/time_inference.py (CPU, small volume, stand-in network)


def test_time_inference_script_runs_the_bundle_and_checks_geometry(tmp_path, restore_logging):
    """The timing script end to end at a small size: every volume timed, outputs with the input's shape and
    affine, network calls counted over SliceInferer's batches, the transforms of the breakdown listed, the
    CLI run timed, the JSON written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("time_inference", REPO / "scripts" / "time_inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conv = {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": "@num_classes", "kernel_size": 1}
    out = tmp_path / "timing.json"
    res = mod.main(out=str(out), size=64, slices=5, copies=2, overrides={"network_def": conv, "image_size": [64, 64],
                   "infer_batch_size": 2}, work_dir=str(tmp_path / "work"), cli="true")
    assert json.loads(out.read_text())["volumes"] == res["volumes"]
    assert [v["cold"] for v in res["volumes"]] == [True, False] and res["outputs_ok"]
    for v in res["volumes"] + [res["breakdown"]["timings"]]:
        assert v["network_calls"] == 3  # 5 slices in batches of 2
        assert v["check"]["shape"] == [64, 64, 5] and v["check"]["affine_max_abs_diff"] == 0.0
        assert 0 < v["network_s"] <= v["inferer_s"] < v["e2e_s"]
    assert res["config"]["num_classes"] == 9 and res["config"]["loader_workers_one_volume"] == 0
    assert res["folder"]["volumes"] == 2 and res["folder"]["loader_workers"] == 1
    assert {"LoadImaged", "Orientationd", "ScaleIntensityRanged", "Resized", "NearestExactInvertd", "SafeSaveImaged",
            "  Resized.inverse (in Invertd)"} <= set(res["breakdown"]["transforms_s"])
    assert res["cli"]["returncode"] == 0 and res["cli"]["wall_s"] > 0
    assert (tmp_path / "work" / "out_cli" / "ct_cli_seg.nii.gz").is_file()
    assert "".join(nib.aff2axcodes(nib.load(str(tmp_path / "work" / "in" / "ct_000.nii.gz")).affine)) == "LPS"
    assert res["targets"]["counts"] is torch.cuda.is_available()  # a CPU run never counts for the H100 target
