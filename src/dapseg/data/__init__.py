"""Benchmark datasets: specs (YAML data), readers for the MMSegmentation layouts, converters."""

from dapseg.data.dataset import Sample, SegDataset, dataset_present, resolve_root
from dapseg.data.io import DataError, UnreadableFileError
from dapseg.data.spec import EXTRA, STANDARD, DatasetSpec, list_datasets, load_dataset_spec

__all__ = ["EXTRA", "STANDARD", "DataError", "DatasetSpec", "Sample", "SegDataset", "UnreadableFileError",
           "dataset_present", "list_datasets", "load_dataset_spec", "resolve_root"]
