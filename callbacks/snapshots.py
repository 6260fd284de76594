"""``StageSnapshots``: the frames a fit leaves behind, per image of the batch.

The reference's progress sheet (the observation, then x at i = 0 and every print_interval
iterations), x at the end of every stage, and with ``save_interval`` (the reference's per-stage
list) x at i = 0 and every save_interval[s] iterations of stage s, written at once as
``<out>/<id>/steps/s<stage>_i<iteration>.png``. Other callbacks (ImageFiles) read the frames;
``stage_labels`` says what each stage frame is ("observation", "stage 2 (it 200)"), and
``stage_ends`` (stage, iteration) where each stage ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from genprior.image_io import safe_name, save_image


class StageSnapshots(L.Callback):
    def __init__(self, print_interval: int = 100, save_interval: list[int] | None = None,
                 out_dir: Path | None = None) -> None:
        self.print_interval = max(1, int(print_interval))
        self.save_interval = list(save_interval) if save_interval else None
        self.out_dir = out_dir
        self.progress_frames: dict[int, list[Tensor]] = {}
        self.stage_frames: dict[int, list[Tensor]] = {}
        self.stage_labels: dict[int, list[str]] = {}
        self.stage_ends: dict[int, list[tuple[int, int]]] = {}  # (stage, iteration), from 1
        self._position: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            self._position = []
            return  # the batch could not start (it is fitted again image by image)
        method = pl_module.method
        if batch_idx == 0:  # a new batch of images: its first frames are the observations
            obs = method.observation_for_display()
            self.progress_frames = {b: [obs[b].cpu()] for b in range(method.batch_size)}
            self.stage_frames = {b: [obs[b].cpu()] for b in range(method.batch_size)}
            self.stage_labels = {b: ["observation"] for b in range(method.batch_size)}
            self.stage_ends = {b: [] for b in range(method.batch_size)}
        progress = method.progress
        self._position = list(zip(progress.stage, progress.iteration))  # of the step about to run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        method = pl_module.method
        record = pl_module.last_record
        x = pl_module.last_x
        if x is None or record is None or not self._position:
            return
        x = method.display(x)
        for b, was_active in enumerate(record.active.tolist()):
            if not was_active:
                continue
            stage, i = self._position[b]
            if i == 0 or (i + 1) % self.print_interval == 0:
                self.progress_frames[b].append(x[b].cpu())
            if pl_module.last_stage_ended[b]:
                self.stage_frames[b].append(x[b].cpu())
                # the stage's last iteration: fewer than its length when it stopped early
                self.stage_ends[b].append((stage + 1, i + 1))
                self.stage_labels[b].append(f"stage {stage + 1} (it {i + 1})")
            if self.save_interval and self.out_dir is not None and stage < len(self.save_interval):
                every = self.save_interval[stage]
                if i == 0 or (every > 0 and i % every == 0):
                    folder = self.out_dir / safe_name(method.ids[b]) / "steps"
                    save_image(x[b], folder / f"s{stage + 1}_i{i:05d}.png", value_range=(0.0, 1.0))
