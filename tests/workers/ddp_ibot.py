"""An iBOT recipe that records, per rank, what must hold across processes: the sample keys it trained on (each
sample once per epoch over all ranks) and a checksum of the centres after every step (identical on all ranks).
Importable as `tests.workers.ddp_ibot:CheckedIBOT` by `accelerate launch` children (the repository is on PYTHONPATH)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sslpipe.recipes.ibot import IBOTRecipe


class CheckedIBOT(IBOTRecipe):
    def step(self, batch, sched):
        loss, metrics = super().step(batch, sched)
        digest = hashlib.sha256()
        for name in ("center", "center2"):
            digest.update(getattr(self.loss, name).detach().cpu().contiguous().numpy().tobytes())
        record = {"it": int(sched["it"]), "epoch": int(sched["epoch"]), "keys": batch["keys"],
                  "centres": digest.hexdigest()}
        run_dir = Path(self.cfg.output_dir) / self.cfg.run_name
        with open(run_dir / f"steps_rank{self.accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return loss, metrics
