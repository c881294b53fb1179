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


# TensorFlow writes C++ start-up notes (and "failed call to cuInit" without a GPU) straight to
# descriptor 2, before absl logging starts, so no setting silences them: unless
# TF_CPP_MIN_LOG_LEVEL was set, the first `import tensorflow` (and its device creation) runs with
# descriptor 2 on /dev/null.
def _find_tensorflow(name, path=None, target=None):
    if name != "tensorflow":
        return None
    sys.meta_path.remove(_QUIET)
    from importlib.machinery import PathFinder
    spec = PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return spec
    exec_module = spec.loader.exec_module

    def quiet(module):
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            exec_module(module)
            module.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    spec.loader.exec_module = quiet
    return spec


_QUIET = sys.modules["types"].SimpleNamespace(find_spec=_find_tensorflow)
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QUIET)

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

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(f"{__name__}.{_PUBLIC[name]}")
        return getattr(module, name)
    if not name.startswith("_"):
        # Any submodule, found when first asked for (no hand-kept list to fall out of date).
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'tfgalflow' has no attribute {name!r}")


def __dir__():
    import pkgutil
    return sorted(set(globals()) | set(_PUBLIC) | {m.name for m in pkgutil.iter_modules(__path__)})
