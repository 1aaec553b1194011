# Copyright (c) fias-monai contributors. Licensed under the Apache License, Version 2.0.
"""Command line of fias-monai: dataset conversion, the synthetic demo and the parameter table.

    python -m fias_monai prepare_acdc_h5 SRC OUT [--overwrite] [--cases patient001,patient019]
    python -m fias_monai prepare_acdc_official SRC OUT [--overwrite] [--outside_split skip]
    python -m fias_monai prepare_synapse SRC OUT [--overwrite]
    python -m fias_monai prepare_btcv SRC OUT [--overwrite]
    python -m fias_monai make_demo OUT [--num_train 8 --num_val 3 --shape "[96,96,12]" --seed 0] [--overwrite]
    python -m fias_monai params [--in_channels 1 --out_channels 9]
    python -m fias_monai COMMAND --help

The converters print the written datalist's path on stdout (so ``DL=$(python -m fias_monai ...)``
works) and their progress and warnings on stderr. Expected failures (missing or existing files, bad
cases, bad arguments) print ``error: ...`` on stderr with no traceback and exit with status 1; for a
partial conversion the good cases and their datalist are written and every failed file is listed.
Set ``FIAS_MONAI_TRACEBACK=1`` to get the traceback instead. Usage errors exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "prepare_acdc_h5",
    "prepare_acdc_official",
    "prepare_synapse",
    "prepare_btcv",
    "make_demo",
    "params",
    "COMMANDS",
    "main",
]

logger = logging.getLogger("fias_monai.cli")


def _path(value: Any, what: str) -> Path:
    """A path argument; fire turns ``123`` or ``True`` into numbers/booleans, so take ``str`` of scalars."""
    if value is None or isinstance(value, (list, tuple, dict)) or value == "":
        raise ValueError(f"{what} must be a folder path, got {value!r}")
    return Path(str(value)).expanduser()


def _cases(value: Any) -> list[str] | None:
    """``--cases a,b`` (fire gives a tuple or a string), ``--cases "[a,b]"`` or one name."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value).split(",")
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError(f"--cases lists no case names: {value!r}")
    return items


def _report(what: str, datalist: Path) -> str:
    doc = json.loads(Path(datalist).read_text(encoding="utf-8"))
    counts = {s: len(doc.get(s, [])) for s in ("training", "validation", "test")}
    total = sum(counts.values())
    logger.info(
        "%s: %d case(s) written (training %d, validation %d, test %d); datalist %s",
        what, total, counts["training"], counts["validation"], counts["test"], datalist,
    )  # fmt: skip
    return str(datalist)


def prepare_acdc_h5(src: str, out: str, overwrite: bool = False, cases: str | None = None) -> str:
    """Convert the SSL4MIS ACDC h5 layout to NIfTI volumes + datalist.json.

    Input: SRC/train.list and SRC/val.list (one patientXXX_frameYY per line) and
    SRC/volumes/patientXXX_frameYY.h5 (or SRC/data/, or SRC itself) with datasets image (Z, H, W)
    float32 in [0, 1] and label (Z, H, W) uint8 (0 background, 1 RV, 2 MYO, 3 LV). train.list ->
    training, val.list -> validation; unlisted files of the 20 TransUNet test patients -> test.
    Output: OUT/imagesTr, labelsTr, imagesTs, labelsTs (NIfTI (H, W, Z), identity affine) and
    OUT/datalist.json, whose path is printed.

    Args:
        src: the ACDC h5 folder.
        out: output folder.
        overwrite: replace existing outputs (otherwise nothing is written if any exists).
        cases: only these cases or patients, comma separated (patient001,patient019_frame01).

    Returns:
        The path of the written datalist.
    """
    from .data import prepare_acdc_h5 as convert

    dl = convert(_path(src, "SRC"), _path(out, "OUT"), overwrite=bool(overwrite), cases=_cases(cases))
    return _report("prepare_acdc_h5", dl)


def prepare_acdc_official(
    src: str, out: str, overwrite: bool = False, cases: str | None = None, outside_split: str = "skip"
) -> str:
    """Convert the official ACDC NIfTI layout to NIfTI volumes + datalist.json.

    Input (searched recursively, e.g. database/training and database/testing):
    patientXXX/patientXXX_frameYY.nii.gz and patientXXX/patientXXX_frameYY_gt.nii.gz. The affine is
    kept and images are min-max scaled to [0, 1] per volume. TransUNet patient split: 10 validation
    and 20 test patients, the rest of 1..100 training. The datalist's path is printed.

    Args:
        src: the ACDC folder.
        out: output folder.
        overwrite: replace existing outputs (otherwise nothing is written if any exists).
        cases: only these cases or patients, comma separated.
        outside_split: patients 101..150: skip (default), training or test.

    Returns:
        The path of the written datalist.
    """
    from .data import prepare_acdc_official as convert

    dl = convert(
        _path(src, "SRC"), _path(out, "OUT"), overwrite=bool(overwrite), cases=_cases(cases),
        outside_split=str(outside_split),
    )  # fmt: skip
    return _report("prepare_acdc_official", dl)


def prepare_synapse(src: str, out: str, overwrite: bool = False, cases: str | None = None) -> str:
    """Convert the TransUNet Synapse layout (npz slices / h5 volumes) to HU NIfTI + datalist.json.

    Input: SRC/train_npz/caseXXXX_sliceYYY.npz and/or SRC/test_vol_h5/caseXXXX.npy.h5, or a flat
    folder of <prefix>_<case>_sliceNNN.npz slices (prefix train_/valid_/test_ picks the split) or
    *.h5 volumes; images in [0, 1] (clip(HU, -125, 275) scaled), labels 0..8 (Synapse organs).
    Slices are stacked per case in slice order; images are written back in HU. The datalist's path
    is printed. Apply the CT window with the bundle's configs/synapse.json overlay.

    Args:
        src: the Synapse folder.
        out: output folder.
        overwrite: replace existing outputs (otherwise nothing is written if any exists).
        cases: only these cases, comma separated (case0005,amos_0001).

    Returns:
        The path of the written datalist.
    """
    from .data import prepare_synapse_transunet as convert

    dl = convert(_path(src, "SRC"), _path(out, "OUT"), overwrite=bool(overwrite), cases=_cases(cases))
    return _report("prepare_synapse", dl)


def prepare_btcv(src: str, out: str, overwrite: bool = False, cases: str | None = None) -> str:
    """Convert raw BTCV (Multi-Atlas Abdomen) NIfTI to the Synapse 8-organ form + datalist.json.

    Input: SRC/img/imgXXXX.nii.gz and SRC/label/labelXXXX.nii.gz (or under SRC/Training or
    SRC/RawData/Training). HU and affine are kept, the 13 BTCV organs are mapped to the 8 Synapse
    ones, cases are named caseXXXX with the TransUNet split. The datalist's path is printed.

    Args:
        src: the BTCV folder.
        out: output folder.
        overwrite: replace existing outputs (otherwise nothing is written if any exists).
        cases: only these output cases, comma separated (case0001,case0002).

    Returns:
        The path of the written datalist.
    """
    from .data import prepare_btcv as convert

    dl = convert(_path(src, "SRC"), _path(out, "OUT"), overwrite=bool(overwrite), cases=_cases(cases))
    return _report("prepare_btcv", dl)


def make_demo(
    out: str,
    num_train: int = 8,
    num_val: int = 3,
    shape: Sequence[int] = (96, 96, 12),
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Generate the synthetic demo dataset (classes 1 large, 2 ring, 3 small) + datalist.json.

    The same data the bundle generates for itself when its dataset_dir has none. The datalist's
    path is printed.

    Args:
        out: output folder.
        num_train: training cases.
        num_val: validation cases.
        shape: volume shape (H, W, Z), e.g. "[96,96,12]"; H, W >= 24, Z >= 3.
        seed: random seed (the same seed gives byte-identical files).
        overwrite: replace existing outputs (otherwise nothing is written if any exists).

    Returns:
        The path of the written datalist.
    """
    from .data import make_demo_dataset

    if isinstance(shape, str):
        shape = [s for s in shape.strip("()[] ").replace("x", ",").split(",") if s.strip()]
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"--shape must be three integers (H, W, Z), e.g. \"[96,96,12]\", got {shape!r}") from None
    dl = make_demo_dataset(
        _path(out, "OUT"), num_train=int(num_train), num_val=int(num_val), shape=shape, seed=int(seed),
        overwrite=bool(overwrite),
    )  # fmt: skip
    return _report("make_demo", dl)


def params(in_channels: int = 1, out_channels: int = 9, variants: str | None = None, ablations: bool = True) -> str:
    """Print the parameter count of every FIAS variant and of the Table 3 ablations of FIAS-tiny.

    Args:
        in_channels: image channels.
        out_channels: classes, background included (9 Synapse, 4 ACDC).
        variants: only these variants, comma separated (tiny,small,base); all by default.
        ablations: include the FIAS-tiny ablations (no DMK, Summation fusion, no MixAtt).

    Returns:
        The table, as Markdown.
    """
    from .params import parameter_table, parameter_table_markdown

    rows = parameter_table(int(in_channels), int(out_channels), variants=_cases(variants), ablations=bool(ablations))
    return parameter_table_markdown(rows, int(in_channels), int(out_channels)).rstrip("\n")


#: The subcommands, in the order ``--help`` lists them.
COMMANDS = {
    "prepare_acdc_h5": prepare_acdc_h5,
    "prepare_acdc_official": prepare_acdc_official,
    "prepare_synapse": prepare_synapse,
    "prepare_btcv": prepare_btcv,
    "make_demo": make_demo,
    "params": params,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted).

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` by default).
    """
    import fire

    from .data import DataConversionError

    if not logging.getLogger().handlers:  # run as a program (not inside an application that set up logging)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        fire.Fire(COMMANDS, command=argv, name="fias_monai")
    except fire.core.FireExit as e:  # usage errors and --help: fire has printed what it had to
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DataConversionError, OSError, ValueError) as e:
        # Expected failures (bad or missing inputs, existing outputs, bad arguments): a clear message,
        # no traceback. Anything else is a bug and keeps its traceback.
        if os.environ.get("FIAS_MONAI_TRACEBACK", "") not in ("", "0"):
            raise
        msg = str(e) if isinstance(e, DataConversionError) else f"{type(e).__name__}: {e}"
        msg = msg.replace("(pass overwrite=True)", "(pass --overwrite)")
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
