"""Weights in and out. Run checkpoints: `checkpoint` (what one is, which a run has: the one listing and finder),
`checkpoint_io` (writing and reading them), `state_io` and `state_dict` (their safetensors files), `resume` (which
one `--resume` continues from), `verify` (against their sha256s: `sslpipe check`). Backbone exports: `export` (the
folder: write, check, load), `card` (its model card), `run_export` (`sslpipe export`), `importing`, `layouts` and
`layouts_dinov3` (`sslpipe import` of official checkpoints), `heads` (projection heads beside an export), `onnx`
(`model.onnx` for inference runtimes). Every sha256: `hashing`.

Of sslpipe it imports only the bottom modules (`errors`, `files`, `metrics_log`) and `config.loading` (a run's
config.yaml read as YAML 1.2), so every stage that reads or writes weights (models, eval, recipes, engine, the
commands) can import it. `training_data` records which shards a run trained on, for the export's card.
"""
