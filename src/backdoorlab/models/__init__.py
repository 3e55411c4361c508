"""Models: the registry :data:`MODELS`, the classifier contract and safe (de)serialisation."""

from backdoorlab.models import cnn, preact_resnet, vgg  # noqa: F401  (register the models)
from backdoorlab.models.base import Classifier, Normalize
from backdoorlab.models.io import ForeignModel, ModelSpec, build_model, export_torchscript, load_model, read_spec, save_model
from backdoorlab.models.registry import MODELS

__all__ = ["MODELS", "Classifier", "ForeignModel", "ModelSpec", "Normalize", "build_model", "export_torchscript", "load_model",
           "read_spec", "save_model"]
