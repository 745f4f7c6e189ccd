"""The periodic kNN probe of the self-supervised recipes: how a run's `data`, `crops` and `eval` sections become the
probe's feature spec and images (`eval.every_epochs`; the probe itself is `sslpipe.eval.knn.knn_probe`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from sslpipe.config import RunConfig
from sslpipe.data.remote import Reading


def periodic_knn(cfg: RunConfig, backbone: nn.Module, accelerator: Any = None) -> dict[str, float]:
    """kNN top-1 of `backbone` on data.val against data.train at the recipe's crop size and normalisation. With an
    `accelerator` of several processes each extracts its share and all get the same result; {} without data.val."""
    from sslpipe.eval.knn import knn_probe
    from sslpipe.eval.spec import FeatureSpec, ProbeData

    data, crops, ev = cfg.data, cfg.crops, cfg.eval
    if not data.val:
        return {}
    spec = FeatureSpec(img_size=crops.global_size, resize=ev.resize, crop=ev.crop, mean=crops.mean, std=crops.std,
                       batch_size=ev.batch_size or data.batch_size, num_workers=data.num_workers)
    remote = Reading(retries=data.retries, retry_backoff=data.retry_backoff, read_timeout=data.read_timeout)
    probe_data = ProbeData(data.train, data.val, data.train_split, data.val_split, ev.max_train, ev.max_val,
                           reading=remote)  # the remote keys only: no sha256 re-hash, no stop on one bad sample
    return knn_probe(backbone, spec, probe_data, k_list=ev.knn_k, T=ev.knn_temperature, accelerator=accelerator)
