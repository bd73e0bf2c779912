"""Where things are: the packaged default model, the user cache folder, and (for tests and benchmarks
run from a source checkout) the real CT data and models beside the repository.

- Default model: ``$FLARE_RT_MODEL``, else the one ``.onnx`` bundle in the package's ``models/``
  folder (package data, found with :mod:`importlib.resources`, so it works from a wheel install).
- Cache (TensorRT engines, timing caches, compiled kernels): ``$FLARE_RT_CACHE``, else
  ``$XDG_CACHE_HOME/flare-rt``, else ``~/.cache/flare-rt``; never inside the installed package.
- Real data and models for tests and ``bench/``: ``$FLARE_RT_DATA`` and ``$FLARE_RT_MODELS``, else
  ``../shared/data`` and ``../shared/models`` beside the source checkout.
"""
from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

MODEL_ENV = "FLARE_RT_MODEL"
CACHE_ENV = "FLARE_RT_CACHE"
DATA_ENV = "FLARE_RT_DATA"
MODELS_ENV = "FLARE_RT_MODELS"
#: The bundle shipped in ``flare_rt/models`` (replaced, not added to, when a better model lands).
DEFAULT_MODEL_NAME = "ts_demo_small_fp16.onnx"


def packaged_model() -> Path:
    """Path of the bundle shipped inside the package."""
    ref = resources.files("flare_rt.models").joinpath(DEFAULT_MODEL_NAME)
    # The package is installed as files (setuptools never zips it), so the resource is a real path.
    path = Path(str(ref))
    if not path.is_file():
        raise ModelError(f"the packaged default model {path} is missing (a broken install?); reinstall flare-rt "
                         f"or pass --model BUNDLE / set ${MODEL_ENV}")
    return path


def default_model() -> Path:
    """``$FLARE_RT_MODEL`` if set, else the packaged default bundle."""
    env = os.environ.get(MODEL_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelError(f"${MODEL_ENV}={env}: no such model bundle; unset it to use the packaged default model")
        return path
    return packaged_model()


def cache_dir(*parts: str, create: bool = True) -> Path:
    """The user cache folder (or a sub-folder of it), created on demand."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flare-rt"
    path = root.joinpath(*parts)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cache folder {path} cannot be created ({exc.strerror}); set ${CACHE_ENV} to a "
                              "writable folder") from exc
        if not os.access(path, os.W_OK):
            raise ConfigError(f"cache folder {path} is not writable; set ${CACHE_ENV} to a writable folder")
    return path


def _checkout_sibling(name: str) -> Path:
    """``<source checkout>/../shared/<name>`` (meaningful only when running from a checkout)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / name


def shared_data_dir() -> Path:
    """Real CTs for tests and benchmarks: ``$FLARE_RT_DATA`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else _checkout_sibling("data")


def shared_models_dir() -> Path:
    """Reference models (nnU-Net folders) for tests and benchmarks: ``$FLARE_RT_MODELS`` or ``../shared/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else _checkout_sibling("models")
