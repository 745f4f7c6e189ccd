"""Self-supervised losses (one per file) and training-health metrics."""

from sslpipe.losses.dino import DINOLoss
from sslpipe.losses.health import health_metrics
from sslpipe.losses.ibot import IBOTLoss

__all__ = ["DINOLoss", "IBOTLoss", "health_metrics"]
