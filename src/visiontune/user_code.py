"""Importing the user's own code (`package.module:function`), only where a config asks for it.

A builder or a loss function named in a config is imported as explicitly as
`trust_remote_code`: nothing of the user's is imported for a config that does not name it.
An import that fails names the config key, the dotted path and the import error itself, so a
typo in a module path, a missing dependency of the user's module and a misspelt function
name are told apart at once.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from visiontune.errors import ConfigError

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_dotted(value: str) -> str:
    """Validate the shape `package.module:function` (for the config schema)."""
    if not _DOTTED.match(value):
        raise ValueError(f"{value!r} is not of the form package.module:function")
    return value


def import_callable(dotted: str, key: str) -> Callable[..., Any]:
    """The callable `dotted` names; a ConfigError naming `key`, the path and the cause."""
    module_name, _, attr = dotted.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while importing
        hint = ""
        if isinstance(err, ModuleNotFoundError) and err.name == module_name.split(".")[0]:
            hint = " (is the folder that holds it on PYTHONPATH?)"
        raise ConfigError(
            [
                f"{key}: cannot import {module_name!r} (from {dotted!r}): "
                f"{type(err).__name__}: {err}{hint}"
            ]
        ) from None
    target = getattr(module, attr, None)
    if target is None:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise ConfigError(
            [f"{key}: module {module_name!r} has no {attr!r} (from {dotted!r}); it has {public}"]
        )
    if not callable(target):
        raise ConfigError([f"{key}: {dotted!r} is a {type(target).__name__}, not a callable"])
    return target
