"""Dataset converters, datalists and synthetic demo data for FIAS.

Every converter writes 3D NIfTI volumes (array axes (H, W, Z): axial slices along the last axis; image
float32, label uint8) plus an MSD-style ``datalist.json`` whose paths are relative to its folder.
"""

from .acdc import ACDC_LABELS, ACDC_TEST_PATIENTS, ACDC_VAL_PATIENTS, prepare_acdc_h5, prepare_acdc_official
from .datalist import DATALIST_NAME, load_datalist, write_datalist
from .io import DataConversionError, InvalidCaseError, write_json_atomic, write_nifti_atomic
from .synapse import (
    BTCV_TO_SYNAPSE,
    SYNAPSE_HU_WINDOW,
    SYNAPSE_LABELS,
    SYNAPSE_TEST_CASES,
    prepare_btcv,
    prepare_synapse_transunet,
)
from .slices import SliceDataset, SliceDatasetError, slice_sampler
from .synthetic import DEMO_LABELS, ensure_demo_dataset, make_demo_dataset

__all__ = [
    "SliceDataset",
    "SliceDatasetError",
    "slice_sampler",
    "prepare_acdc_h5",
    "prepare_acdc_official",
    "prepare_synapse_transunet",
    "prepare_btcv",
    "make_demo_dataset",
    "ensure_demo_dataset",
    "write_datalist",
    "load_datalist",
    "write_nifti_atomic",
    "write_json_atomic",
    "DataConversionError",
    "InvalidCaseError",
    "DATALIST_NAME",
    "ACDC_LABELS",
    "ACDC_VAL_PATIENTS",
    "ACDC_TEST_PATIENTS",
    "SYNAPSE_LABELS",
    "SYNAPSE_HU_WINDOW",
    "SYNAPSE_TEST_CASES",
    "BTCV_TO_SYNAPSE",
    "DEMO_LABELS",
]
