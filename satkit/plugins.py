"""A user's own modules (an attention variant, an encoder, a metric) imported before the registries are read.

Training names them in its config (`imports: [my_pkg.my_attention]`, as mmengine's `custom_imports`) and
records them in its checkpoints; eval.py, caption.py and the Captioner take `--import MODULE` /
`imports=`. A checkpoint is never a reason to import code on its own: one whose run imported modules that
this process has not is refused in one line naming the `--import` to add.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from satkit.infra.runtime import UserError

__all__ = ["import_plugins", "imported_plugins", "check_plugins", "import_args_parser", "file_module_name"]

_IMPORTED: list[str] = []  # the module names import_plugins imported in this process


def module_name(name: str) -> str:
    """A plugin's module name: the dotted name, or a .py file's stem (so a file moved elsewhere is the same)."""
    return Path(name).stem if _is_file(name) else name


def _is_file(name: str) -> bool:
    return name.endswith(".py") or os.sep in name


def import_plugins(modules: Sequence[str]) -> list[str]:
    """Import each module: a dotted name (found on sys.path or from the current folder) or the path of a
    .py file. Its registrations then take effect. Returns the names as given."""
    for name in modules:
        if module_name(name) in _IMPORTED:
            continue
        _import_one(name)
        _IMPORTED.append(module_name(name))
    return list(modules)


def file_module_name(path: Path) -> str:
    """The name a plugin file takes in sys.modules: its own (`satkit_plugin_<stem>_<hash of its path>`), never its
    stem, so that a plugin saved as models.py or datasets.py does not become what `import models` (or Hugging
    Face's `import datasets`) returns for the rest of the process."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"satkit_plugin_{stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"


def _import_one(name: str) -> None:
    if _is_file(name):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"import {name}: no such file")
        spec = importlib.util.spec_from_file_location(file_module_name(path), path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]  # before it runs: dataclasses look it up
        spec.loader.exec_module(module)  # type: ignore[union-attr]  # its own errors keep their traceback
        return
    if os.getcwd() not in sys.path:  # as `python -m` would: a module beside the user, not beside train.py
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.split(".")[: len(e.name.split("."))] == e.name.split("."):
            raise UserError(f"import {name}: no module named {e.name!r} (on the path or in {os.getcwd()})") from None
        raise  # the plugin's own missing dependency: its traceback says where


def imported_plugins() -> list[str]:
    return list(_IMPORTED)


def check_plugins(recorded: Sequence[str], source: str, flag: str = "--import {}") -> None:
    """Refuse a checkpoint whose run imported modules this process has not imported; `flag` says how to
    ask for one (train.py: imports=NAME)."""
    missing = [name for name in recorded if module_name(name) not in _IMPORTED]
    if missing:
        flags = " ".join(flag.format(name) for name in missing)
        raise UserError(f"{source}: its run imported {', '.join(missing)}; add {flags} (imported only when asked)")


def import_args_parser() -> argparse.ArgumentParser:
    """The `--import MODULE` flag that eval.py and caption.py share (a parent parser)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE (dotted name or .py file) first: a checkpoint trained with "
                             "`imports:` needs the same modules (repeatable)")
    return parser
