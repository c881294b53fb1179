"""tfgalflow: conditional normalizing flows on astrophysical phase-space data.

Learn a galaxy's stellar distribution function f(x, v) from a 6D sample with a masked
autoregressive flow (TensorFlow Probability), then recover gravitational accelerations from the
collisionless Boltzmann equation  v . df/dx + a . df/dv = 0  as a batched least-squares problem.

TensorFlow Probability needs Keras 2 (``tf_keras``), so ``TF_USE_LEGACY_KERAS=1`` is set here,
before anything in the package imports TensorFlow. Submodules are imported lazily, so that
``import tfgalflow`` and the pure-NumPy physics (``tfgalflow.hernquist``) stay fast.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"


# ---- TensorFlow's C++ start-up chatter ----------------------------------------------------------
# Importing TensorFlow (and creating its devices) prints oneDNN/CPU-feature notes and, on a machine
# without a GPU, "failed call to cuInit: CUDA error" straight to file descriptor 2, before absl
# logging is initialised, so no environment variable silences it. Unless the user asked for
# TensorFlow's logs (TF_CPP_MIN_LOG_LEVEL set before tfgalflow was imported), the first import of
# TensorFlow runs with descriptor 2 pointed at /dev/null; errors raised by the import itself still
# propagate.

class _QuietLoader:
    """Loader wrapper (importlib protocol): runs the real loader with descriptor 2 on /dev/null."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            self.loader.exec_module(module)
            module.config.list_physical_devices()        # device creation: where cuInit complains
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietTensorFlowFinder:
    """Meta-path finder (importlib protocol) that wraps the loader of the first
    ``import tensorflow``.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)                       # once, and never for the nested imports
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowFinder())

__version__ = "0.1.0"

# Public name -> submodule that defines it. Resolved on first attribute access (PEP 562).
_PUBLIC = {
    "Hernquist": "hernquist",
    "Catalogue": "catalogue",
    "sample_hernquist": "mocks",
    "sample_emcee": "mocks",
    "add_noise": "mocks",
    "FlowConfig": "flows",
    "Flow": "model",
    "Ensemble": "model",
    "TrainConfig": "training",
    "train": "training",
    "resume": "training",
    "load_run": "training",
    "load": "export",
    "export_model": "export",
    "Density": "density",
    "ExactDF": "exact",
    "accelerations": "cbe",
    "SphericalAverage": "symmetry",
}

_SUBMODULES = (
    "units", "validation", "density", "exact", "hernquist", "mocks", "catalogue", "flows", "model",
    "training",
    "cbe", "symmetry", "export", "serving", "plots", "study", "cli",
)

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(f"{__name__}.{_PUBLIC[name]}")
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tfgalflow' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
