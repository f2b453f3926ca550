"""Checks run before a model is loaded: the transformers release, and whether a local model path exists.

- `check_transformers_version()`: the forward path reuses transformers' LLaVA / CLIP / Llama internals
  (attention interfaces, cache layout, processor behaviour), and releases other than `TESTED_TRANSFORMERS`
  give different answers (5.20-5.23 answer the demo's colour question wrongly, with no error). So any other
  release is refused with `UntestedTransformersError`, unless `$M2PT_ALLOW_UNTESTED_TRANSFORMERS=1`, which
  logs a warning instead.
- `check_model_source(name)`: a name that is clearly meant as a local path (it starts with `/`, `.` or `~`, or
  its first path component is an existing directory, like `demo/bsae`) but does not exist raises
  `ModelPathError` saying so, instead of the hub's "could not connect" error.

Both raise subclasses of `ValueError` with a message that says what to do. Nothing runs at import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TESTED_TRANSFORMERS = "5.24"  # major.minor; patch releases of it are accepted
ALLOW_ENV = "M2PT_ALLOW_UNTESTED_TRANSFORMERS"


class UntestedTransformersError(ValueError):
    """The installed transformers is not the release the forward path is tested with."""


class ModelPathError(ValueError):
    """A local model path that does not exist."""


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def installed_transformers() -> str:
    """The version of the transformers package that is imported."""
    import transformers

    return str(transformers.__version__)


def check_transformers_version(installed: str | None = None) -> None:
    """Refuse a transformers release other than `TESTED_TRANSFORMERS`.x (see the module contract)."""
    installed = installed if installed is not None else installed_transformers()
    if _major_minor(installed) == TESTED_TRANSFORMERS:
        return
    message = (
        f"transformers {installed} is installed, but m2pt is tested with transformers "
        f"{TESTED_TRANSFORMERS}.x only (other releases give different answers); install the tested versions "
        f"with `bash scripts/setup.sh` (pip install -c constraints.txt), or set {ALLOW_ENV}=1 to run anyway"
    )
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        log.warning("%s (%s is set: continuing with an untested release)", message, ALLOW_ENV)
        return
    raise UntestedTransformersError(message)


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a filesystem path rather than a hub id."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # hub ids have at most one "/"
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def check_model_source(name: str) -> None:
    """Raise `ModelPathError` when `name` is meant as a local directory that does not exist."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelPathError(f"model path {name!r} is a file; pass the checkpoint directory")
        return
    if looks_local(name):
        raise ModelPathError(
            f"model path {name!r} does not exist (no such local directory); check the spelling"
        )
