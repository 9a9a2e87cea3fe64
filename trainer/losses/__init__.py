"""The loss terms, one per module in this package, each registered with `register`."""

from __future__ import annotations

from trainer.settings import TrainConfig
from trainer.losses.base import TERMS, LossTerm


def terms_from_settings(t: TrainConfig) -> list[LossTerm]:
    """Every registered term that the settings switch on (every module of this package
    registers its own, so a new term is its own file and its setting)."""
    return [term for cls in TERMS if (term := cls.from_settings(t)) is not None]
