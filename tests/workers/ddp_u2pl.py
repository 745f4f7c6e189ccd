"""A U2PL recipe that, after every step, appends a checksum of the memory queues (and their sizes) to
RUN/queues_rank{r}.jsonl: the 2-process test checks they are identical on both ranks after each step (importable as
`tests.workers.ddp_u2pl:CheckedU2PL` by `accelerate launch` children; the repository is on PYTHONPATH)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sslpipe.recipes.u2pl import U2PLRecipe


class CheckedU2PL(U2PLRecipe):
    def step(self, batch, sched):
        loss, metrics = super().step(batch, sched)
        digest = hashlib.sha256()
        for c in range(self.num_classes):
            digest.update(self.queues.queue(c).detach().cpu().contiguous().numpy().tobytes())
        record = {"it": int(sched["it"]), "sizes": self.queues.sizes(), "queues": digest.hexdigest(),
                  "keys_u": batch["keys_u"]}
        run_dir = Path(self.cfg.output_dir) / self.cfg.run_name
        with open(run_dir / f"queues_rank{self.accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return loss, metrics
