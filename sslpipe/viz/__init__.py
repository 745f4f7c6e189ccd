"""Pictures of predictions, backbones and runs (docs/finetune.md, docs/internals.md)."""
