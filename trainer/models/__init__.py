"""The family registry: a model folder's `model_index.json` `_class_name` -> the adapter (and variant) that trains it.

Every module in this package that defines a family registers its adapter class with `@register`; the modules are
found by listing the package, so a new family file needs no edit here. Families kept outside the package are named
in the environment variable TRAINER_FAMILIES (comma-separated module names, importable from sys.path). Tools
(inference, planner, converters, benches) ask the registry instead of naming families.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path

_BY_PIPELINE: dict[str, type] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator for a ModelAdapter subclass: makes each of its variants' pipelines resolvable."""
    for v in cls.variants:
        other = _BY_PIPELINE.get(v.pipeline)
        if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"pipeline {v.pipeline} is registered twice ({other.__name__} and {cls.__name__})")
        _BY_PIPELINE[v.pipeline] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for name in filter(None, (m.strip() for m in os.environ.get("TRAINER_FAMILIES", "").split(","))):
        importlib.import_module(name)


def families() -> list[type]:
    """Every registered adapter class."""
    _load_all()
    return list(dict.fromkeys(_BY_PIPELINE.values()))


def variants() -> dict[str, tuple[type, object]]:
    """variant name -> (adapter class, Variant), for tools that take a --family name."""
    return {v.name: (cls, v) for cls in families() for v in cls.variants}


def lookup(pipeline_class: str) -> tuple[type, object] | None:
    """(adapter class, Variant) for a model_index `_class_name`, or None when no family trains it."""
    _load_all()
    cls = _BY_PIPELINE.get(pipeline_class)
    if cls is None:
        return None
    return cls, next(v for v in cls.variants if v.pipeline == pipeline_class)


def read_model_index(name_or_path: str, file: str = "model_index.json") -> dict:
    """model_index.json (or another json file) of a local folder or a cached / downloadable hub id."""
    p = Path(name_or_path)
    if not p.is_dir():
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, file)).read_text())
    return json.loads((p / file).read_text())


def resolve(name_or_path: str) -> tuple[type, object]:
    """(adapter class, Variant) of a model folder / hub id; ValueError naming the supported pipelines otherwise."""
    name = read_model_index(name_or_path).get("_class_name", "?")
    found = lookup(name)
    if found is None:
        raise ValueError(f"pipeline {name} is not supported (supported: {', '.join(sorted(_BY_PIPELINE))})")
    return found
