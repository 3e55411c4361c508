"""Models: the registry :data:`MODELS`, the classifier contract and safe (de)serialisation.

Every module of this folder is imported (:func:`backdoorlab.registry.discover`): a new architecture
is one file here, or a plugin (see :mod:`backdoorlab.registry`).
"""

from backdoorlab.models.base import Classifier, Normalize
from backdoorlab.models.io import (
    ForeignModel, ModelSpec, build_model, export_model, export_program, export_torchscript, load_model, read_spec, save_model,
)
from backdoorlab.models.registry import MODELS
from backdoorlab.registry import discover

discover(__name__)  # register the models: every module of this package

__all__ = ["MODELS", "Classifier", "ForeignModel", "ModelSpec", "Normalize", "build_model", "export_model", "export_program",
           "export_torchscript", "load_model",
           "read_spec", "save_model"]
