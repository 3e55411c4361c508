"""``backdoorlab serve``: the guarded model (a model behind a fitted input detector, seed 001's
system) as an HTTP inference service.

- :mod:`~backdoorlab.serve.service`: :class:`GuardService` loads the model, the clean held-out
  images and the detector (fitted at start-up, or restored from ``guard --save-threshold``), and
  answers a batch of uint8 images with the guarded prediction, the score and the verdict.
- :mod:`~backdoorlab.serve.batcher`: a bounded queue that gathers concurrent requests into one
  batch (short maximum wait) and runs it off the event loop.
- :mod:`~backdoorlab.serve.worker`: the model in a worker process of its own, fed raw uint8 images
  over a pipe (the event loop's Python never holds up the model).
- :mod:`~backdoorlab.serve.decode`: request bodies (JSON nested lists, PNG / JPEG / npz uploads) to
  images, every malformed kind a 4xx naming the problem.
- :mod:`~backdoorlab.serve.metrics`: counters and histograms in the Prometheus text format.
- :mod:`~backdoorlab.serve.app`: the FastAPI application (``/v1/predict``, ``/v1/explain``,
  ``/healthz``, ``/metrics``, ``/docs``, the page at ``/``).
"""

from backdoorlab.serve.app import create_app
from backdoorlab.serve.service import GuardService

__all__ = ["GuardService", "create_app"]
