"""Dice ceiling of a segmentation predicted at a coarser output stride, from the ground truth alone.

FIAS's deep-supervision heads sit on the decoder's 1/4, 1/8 and 1/16 maps and are upsampled bilinearly to
the input (as in the paper's code), while BasicUNet and SwinUNETR decode to full resolution. This script
measures what the stride alone costs, without a network: each validation slice's one-hot label at the
training size (256x256) is average-pooled by the stride (the best a head at that stride can say:
the class fractions of each cell), upsampled back bilinearly, argmaxed, resized to the scan's grid
and scored by the protocol's 3D per-class Dice, as the bundle evaluates predictions.

``--mode nearest`` is how the bundle resampled label maps until 0.2.6 (PyTorch's "nearest", which takes
source pixel floor(i * in / out)); ``nearest-exact`` (pixel centres, the default) is how it does since.
``--mode`` resamples the label both ways. At stride 1 the script measures what the label round trip alone
costs.

    python scripts/resolution_ceiling.py --datalist .data/acdc_nifti/datalist.json --strides 1,2,4,8 --mode nearest-exact
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from fias_monai.metrics import case_dice
from fias_monai.transforms import LABEL_RESAMPLE_MODE


def ceiling(label: np.ndarray, num_classes: int, stride: int, size: int = 256,
            mode: str = LABEL_RESAMPLE_MODE) -> np.ndarray:
    """(H, W, Z) label -> the (H, W, Z) label a perfect head at ``stride`` would give after the protocol,
    with the label maps resampled by ``mode`` both ways."""
    lab = torch.from_numpy(label.astype(np.int64)).permute(2, 0, 1)[:, None].float()  # Z, 1, H, W
    small = F.interpolate(lab, size=(size, size), mode=mode)[:, 0].long()
    onehot = F.one_hot(small, num_classes).permute(0, 3, 1, 2).float()
    if stride > 1:
        onehot = F.avg_pool2d(onehot, stride)
        onehot = F.interpolate(onehot, size=(size, size), mode="bilinear", align_corners=False)
    pred = onehot.argmax(1, keepdim=True).float()
    back = F.interpolate(pred, size=label.shape[:2], mode=mode)[:, 0]
    return back.permute(1, 2, 0).numpy().astype(np.uint8)


def main(datalist: str = ".data/acdc_nifti/datalist.json", section: str = "validation", strides: str = "1,2,4,8",
         num_classes: int = 4, mode: str = LABEL_RESAMPLE_MODE, out: str = "") -> dict:
    root = Path(datalist).parent
    cases = json.loads(Path(datalist).read_text())[section]
    labels = [np.asarray(nib.load(root / case["label"]).dataobj) for case in cases]  # read once for all strides
    strides_list = [int(s) for s in str(strides).split(",")] if not isinstance(strides, tuple) else list(strides)
    result = {}
    for stride in strides_list:
        per_class = {c: [] for c in range(1, num_classes)}
        for label in labels:
            dice = case_dice(ceiling(label, num_classes, stride, mode=mode), label, num_classes)
            for c in per_class:
                per_class[c].append(dice[c])
        means = {c: 100 * float(np.mean(v)) for c, v in per_class.items()}
        result[stride] = {"per_class": means, "mean": float(np.mean(list(means.values())))}
        print(f"{mode}, stride {stride}: mean {result[stride]['mean']:.2f} "
              + " ".join(f"class {c} {d:.2f}" for c, d in means.items()), flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    fire.Fire(main)
