"""Data sources (registry :data:`DATASETS`), splits and the in-memory :class:`TensorLoader`.

Every module of this folder is imported (:func:`backdoorlab.registry.discover`): a new source is
one file here, or a plugin (see :mod:`backdoorlab.registry`).
"""

from backdoorlab.data.loader import Augment, TensorLoader, random_crop
from backdoorlab.data.sources import DATASETS, RawData, default_root, load_source, to_imageset
from backdoorlab.data.split import make_splits, stratified_indices, stratified_subsample
from backdoorlab.registry import discover

discover(__name__)  # register the data sources: every module of this package

__all__ = [
    "DATASETS", "Augment", "RawData", "TensorLoader", "default_root", "load_source", "make_splits",
    "random_crop", "stratified_indices", "stratified_subsample", "to_imageset",
]
