"""A DINO recipe that, at each evaluation, writes a checksum of what must agree across ranks (student, teacher,
centre) to RUN/state_rank{r}.txt; used by the 2-process test (importable as `tests.workers.ddp_dino:CheckedDINO`)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from sslpipe.recipes.dino import DINORecipe


class CheckedDINO(DINORecipe):
    def evaluate(self, epoch: int) -> dict[str, float]:
        digest = hashlib.sha256()
        student = self.accelerator.unwrap_model(self.student)
        for module in (student, self.teacher, self.loss):
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        run_dir = Path(self.cfg.output_dir) / self.cfg.run_name
        (run_dir / f"state_rank{self.accelerator.process_index}.txt").write_text(
            f"{digest.hexdigest()} {float(self.loss.center.abs().sum()):.6e}")
        return {}
