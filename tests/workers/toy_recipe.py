"""A tiny deterministic recipe for the engine tests: an MLP student, an EMA teacher and a centre, on in-memory data.

Selected with `method: tests.workers.toy_recipe:ToyRecipe`. It uses the global torch RNG in every step (input noise and
dropout) so that exact resume also checks RNG restoration. Options through `model.kwargs`:
`n_samples` (default 48), `hidden` (the width, default 16), `nan_at_step` (make the loss NaN at that iteration),
`signal_at_step` (send this process SIGUSR1 at that iteration), `touch_at_step` (create train.stop_file at that
iteration) and `write_checksums` (in `evaluate`, each rank writes
the sha256 of its student + teacher parameters to RUN/params_rank{r}.txt).
"""
from __future__ import annotations

import copy
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sslpipe.models.heads import cancel_last_layer_gradients
from sslpipe.recipes.base import Recipe
from sslpipe.recipes.multicrop import teacher_schedule
from sslpipe.recipes.sections import TeacherStudentConfig

IN_DIM, HIDDEN, OUT_DIM = 8, 16, 4


class ToyNet(nn.Module):
    def __init__(self, hidden: int = HIDDEN, depth: int = 1) -> None:
        super().__init__()
        layers = [nn.Linear(IN_DIM, hidden), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        self.body = nn.Sequential(*layers, nn.Dropout(0.1))
        self.last_layer = nn.Linear(hidden, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.body(x))


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


class ToyRecipe(Recipe):
    config_key = "toy"
    config_section = TeacherStudentConfig  # EMA momentum, teacher temperature, last-layer freeze, loss.*

    def build(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        opts = self.cfg.model.kwargs
        self.n_samples = int(opts.get("n_samples", 48))
        self.nan_at_step = opts.get("nan_at_step")
        self.student = ToyNet(int(opts.get("hidden", HIDDEN)), int(opts.get("depth", 1)))
        self.teacher = copy.deepcopy(self.student).to(accelerator.device).requires_grad_(False)
        self.center = torch.zeros(1, OUT_DIM, device=accelerator.device)
        data_gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(self.n_samples, IN_DIM, generator=data_gen)
        self.y = torch.randint(0, 3, (self.n_samples,), generator=data_gen)

    def _student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def param_groups(self) -> list[dict[str, Any]]:
        decay = [p for n, p in self._student().named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self._student().named_parameters() if p.ndim <= 1]
        return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]

    def steps_per_epoch(self, world_size: int) -> int:
        return (self.n_samples // world_size) // self.cfg.data.batch_size

    def train_loader(self, epoch: int, rank: int, world_size: int) -> DataLoader:
        """A real DataLoader (its iterator draws a base seed from the global RNG, as the shard loader's does)."""
        perm = torch.randperm(self.n_samples, generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        bs = self.cfg.data.batch_size
        mine = perm[rank::world_size][: self.steps_per_epoch(world_size) * bs].tolist()
        return DataLoader(TensorDataset(self.x, self.y), batch_size=bs, sampler=mine, collate_fn=_collate)

    def step(self, batch: dict[str, torch.Tensor], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["x"].to(self.accelerator.device)
        with torch.no_grad():
            t = self.teacher(x)
            target = torch.softmax((t - self.center) / sched["teacher_temp"], dim=-1)
        s = self.student(x + 0.1 * torch.randn_like(x))
        loss = -(target * torch.log_softmax(s / self.section.loss.student_temp, dim=-1)).sum(-1).mean()
        if self.nan_at_step is not None and int(sched["it"]) == int(self.nan_at_step):
            loss = loss * float("nan")
        if int(sched["it"]) == self.cfg.model.kwargs.get("signal_at_step", -1):
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM's --signal=USR1 does before the time limit
        if int(sched["it"]) == self.cfg.model.kwargs.get("touch_at_step", -1):
            Path(self.cfg.train.stop_file).touch()  # what launch/slurm.sbatch's USR1 trap does
        batch_center = self.accelerator.reduce(t.mean(0, keepdim=True), "mean")
        self.center = (self.center * self.section.loss.center_momentum
                       + batch_center * (1 - self.section.loss.center_momentum))
        return loss, {"toy_center_norm": float(self.center.norm())}

    def schedule(self, it: int, steps_per_epoch: int, total: int) -> dict[str, float]:
        return teacher_schedule(self.section, it, steps_per_epoch, total)

    def before_optimizer_step(self, sched: dict[str, float]) -> None:
        if sched["last_layer_frozen"]:
            cancel_last_layer_gradients(self.student)

    @torch.no_grad()
    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        m = sched["momentum"]
        student = dict(self._student().named_parameters())
        for name, p in self.teacher.named_parameters():
            p.mul_(m).add_(student[name].detach(), alpha=1 - m)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        state["center"] = self.center
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("teacher.")})
        self.center = state["center"].to(self.accelerator.device)

    def backbone(self, which: str = "teacher") -> nn.Module:
        return (self.teacher if which == "teacher" else self._student()).body

    def evaluate(self, epoch: int) -> dict[str, float]:
        if self.cfg.model.kwargs.get("write_checksums"):
            digest = hashlib.sha256()
            for net in (self._student(), self.teacher):
                for name, p in sorted(net.state_dict().items()):
                    digest.update(name.encode())
                    digest.update(p.detach().cpu().contiguous().numpy().tobytes())
            run_dir = Path(self.cfg.output_dir) / str(self.cfg.run_name)
            (run_dir / f"params_rank{self.accelerator.process_index}.txt").write_text(digest.hexdigest())
        return {"toy_eval": float(epoch)}
