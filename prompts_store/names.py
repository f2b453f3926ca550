"""Bundle names, versions and `name@version` references: the one place that decides what is a valid
identifier.

Names and versions match `^[a-z0-9][a-z0-9._-]{0,63}$`, so they can never spell a path (`..`, `/`, a leading
dot, NUL) and are checked before any path is built from them. This module builds no paths and touches no
files.
"""

from __future__ import annotations

import re

from prompts_store.errors import BundleNameError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RULE = "1 to 64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_name(name: object, what: str = "bundle name") -> str:
    """Return `name` if it is a valid name, else raise `BundleNameError` saying what the rule is."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BundleNameError(
            f"invalid {what} {_show(name)}: use {_RULE} (for example 'colors' or 'digits-v2')"
        )
    return name


def validate_version(version: object) -> str:
    """Same rule as names (auto-assigned versions are `v1`, `v2`, ...)."""
    return validate_name(version, what="bundle version")


def parse_ref(ref: object) -> tuple[str, str | None]:
    """Split `"name"` or `"name@version"` into `(name, version | None)`, validating both parts."""
    if not isinstance(ref, str):
        raise BundleNameError(f"invalid bundle reference {_show(ref)}: expected 'name' or 'name@version'")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if sep:
        return name, validate_version(version)
    return name, None
