"""Who hears about a compile as it runs: the CLI's progress lines and bars, and its warnings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lepton_cli.pipeline.context import ProgressReport
from lepton_cli.pipeline.instruments import StepProgress


@dataclass(frozen=True)
class Listeners:
    progress: StepProgress | None = None  # each pass's start and finished record
    on_warning: Callable[[str], None] | None = None  # each warning as it is raised (the report keeps them all)
    on_progress: ProgressReport | None = None  # a pass's own progress (``PassContext.progress``)

    def for_variant(self, name: str) -> Listeners:
        """The same listeners, with every pass name and warning prefixed by the variant's name."""
        progress, on_warning, on_progress = self.progress, self.on_warning, self.on_progress

        def step(pass_name: str, phase: str, record: object) -> None:
            if progress:
                progress(f"{name}/{pass_name}", phase, record)  # type: ignore[arg-type]

        def warn(message: str) -> None:
            if on_warning:
                on_warning(f"variant {name}: {message}")

        def report(pass_name: str, message: str, done: int | None, total: int | None) -> None:
            if on_progress:
                on_progress(f"{name}/{pass_name}", message, done, total)

        return Listeners(step, warn, report)
