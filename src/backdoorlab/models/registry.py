"""The model registry (:data:`MODELS`). Factories take ``num_classes`` and ``input_shape``."""

from backdoorlab.registry import Registry

from torch import nn

MODELS: Registry[nn.Module] = Registry("model")
