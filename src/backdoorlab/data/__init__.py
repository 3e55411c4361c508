"""Data sources (registry :data:`DATASETS`), splits and the in-memory :class:`TensorLoader`."""

from backdoorlab.data.loader import Augment, TensorLoader, random_crop
from backdoorlab.data.sources import DATASETS, RawData, default_root, load_source, to_imageset
from backdoorlab.data.split import make_splits, stratified_indices, stratified_subsample

__all__ = [
    "DATASETS", "Augment", "RawData", "TensorLoader", "default_root", "load_source", "make_splits",
    "random_crop", "stratified_indices", "stratified_subsample", "to_imageset",
]
