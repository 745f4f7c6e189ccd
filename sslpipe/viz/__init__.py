"""Pictures of predictions, backbones and runs (docs/finetune.md, docs/show_and_report.md, docs/internals.md)."""
