"""The library behind the scripts at the root (train.py, eval.py, caption.py, create_input_files.py);
`pip install .` installs it alone.

Model side at this level (model, attention, encoders, decoding, config, checkpoints, captioner, figures,
plugins, validation); data/ packs and streams datasets, training/ and evaluation/ are the two loops'
engines, infra/ is what every run needs (errors, devices, atomic files, progress, seeding). One name is
exported here, `from satkit import Captioner` (the Python API), and it loads on first use, so that
`import satkit.config` does not pull in the model; everything else by its module:
`from satkit.data.packing import pack`, never `satkit.pack`.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Captioner"]
_LAZY = {"Captioner": "satkit.captioner"}  # name -> the module that defines it


def __getattr__(name: str) -> Any:
    """PEP 562: `satkit.Captioner` imports satkit.captioner the first time it is asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'satkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
