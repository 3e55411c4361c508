"""backdoorlab: attack and defend image classifiers against backdoor data poisoning.

The top-level import is light on purpose: submodules (``backdoorlab.data``,
``backdoorlab.models``, ``backdoorlab.attacks``, ...) import torch when used.
"""

from backdoorlab.errors import BackdoorLabError

__version__ = "0.1.0"
__all__ = ["BackdoorLabError", "__version__"]
