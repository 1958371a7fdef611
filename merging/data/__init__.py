"""Data sets with several tasks on the same input, behind one interface (``load_dataset``)."""

from merging.data import composite, digits, files, glyphs, scenes  # noqa: F401  (registration side effects)
from merging.data.base import MultitaskData, Preprocessing, Splits, list_datasets, load_dataset, register_dataset

__all__ = ["MultitaskData", "Preprocessing", "Splits", "list_datasets", "load_dataset", "register_dataset"]
