"""The loss terms, one per module in this package, each registered with `register`."""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.config import TrainConfig
from trainer.losses.base import TERMS, LossTerm


def terms_from_settings(t: TrainConfig) -> list[LossTerm]:
    """Every registered term that the settings switch on (each module of this package is
    imported, so a new term is its own file and its settings)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return [term for cls in TERMS.values() if (term := cls.from_settings(t)) is not None]
