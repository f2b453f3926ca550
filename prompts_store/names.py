"""Bundle names, versions and `name@version` references: the one place that decides what is a valid
identifier.

Grammar (names and versions alike): 1 to 64 characters, lowercase ASCII letters and digits in runs joined by
single '.', '_' or '-' (`^[a-z0-9]+([._-][a-z0-9]+)*$`). So an identifier can never spell a path (`.`, `..`,
`/`, a leading or trailing dot, NUL), never differs from another one only by case, and never looks like the
store's own bookkeeping: the reserved words below (`latest`, `index`, the Windows device names, ...) and any
identifier whose last dot-separated part is a reserved suffix (`index.json`, `x.lock`, `x.tmp`,
`tensors.safetensors`) are refused. The store builds paths only from identifiers that passed this check, so
a user-chosen name or version cannot collide with `index.json`, `.tmp/`, `.locks/` or a temp file.

This module builds no paths and touches no files.
"""

from __future__ import annotations

import re

from prompts_store.errors import BundleNameError

MAX_LEN = 64
NAME_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
RESERVED = frozenset(
    {"latest", "index", "manifest", "tensors", "tmp", "temp", "lock", "locks", "store", "con", "prn", "aux"}
    | {"nul", "clock$"}
    | {f"{dev}{i}" for dev in ("com", "lpt") for i in range(10)}
)
RESERVED_SUFFIXES = frozenset({"json", "lock", "tmp", "temp", "safetensors", "part", "partial", "swp"})
_RULE = (
    f"1 to {MAX_LEN} characters: lowercase letters and digits, joined by single '.', '_' or '-' "
    "(no leading, trailing or doubled separators)"
)
SHOW_CHARS = 80


def show(value: object, limit: int = SHOW_CHARS) -> str:
    """`repr(value)` cut to `limit` characters: how error messages quote client-chosen text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_valid(value: object) -> bool:
    """True when `value` is a valid name/version (the same rule `validate_name` applies)."""
    if not isinstance(value, str) or len(value) > MAX_LEN or not NAME_RE.fullmatch(value):
        return False
    first, dot, _ = value.partition(".")
    suffix = value.rsplit(".", 1)[-1] if dot else ""
    return first not in RESERVED and suffix not in RESERVED_SUFFIXES


def validate_name(name: object, what: str = "bundle name") -> str:
    """Return `name` if it is a valid name, else raise `BundleNameError` saying what the rule is."""
    if not isinstance(name, str) or not is_valid(name):
        reserved = isinstance(name, str) and len(name) <= MAX_LEN and NAME_RE.fullmatch(name) is not None
        why = "is reserved for the store's own files" if reserved else "is not allowed"
        raise BundleNameError(
            f"invalid {what} {show(name)} ({why}): use {_RULE}, and not a reserved word such as 'latest' "
            "or 'index.json' (for example 'colors' or 'digits-v2')"
        )
    return name


def validate_version(version: object) -> str:
    """Same rule as names (auto-assigned versions are `v1`, `v2`, ...)."""
    return validate_name(version, what="bundle version")


def parse_ref(ref: object) -> tuple[str, str | None]:
    """Split `"name"` or `"name@version"` into `(name, version | None)`, validating both parts."""
    if not isinstance(ref, str):
        raise BundleNameError(f"invalid bundle reference {show(ref)}: expected 'name' or 'name@version'")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if sep:
        return name, validate_version(version)
    return name, None
