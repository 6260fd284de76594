"""The part of the method interface that is read straight off a method's settings and progress."""

from __future__ import annotations

from typing import Any

from genprior.schedule import Progress


class SettingsAccessors:
    """Mixin for methods with ``settings`` (print_interval, betas, eps) and ``progress``."""

    settings: Any
    progress: Progress

    def total_steps(self) -> int:
        return self.progress.total_steps()

    @property
    def print_interval(self) -> int:
        return self.settings.print_interval

    @property
    def betas(self) -> tuple[float, float]:
        return self.settings.betas

    @property
    def eps(self) -> float:
        return self.settings.eps
