"""The demo model and the experiments, kept apart from the trainer (`training/`) they use.

- `synthetic`: PIL-drawn scenes with natural questions (the demo base's pretraining tasks and the held-out
  ones; also the trainer's built-in `synthetic:<task>` datasets);
- `base`: pretraining the shipped demo base (`demo/base`) and the `m2pt demo …` commands; `data` (its
  tokenisation and batches), `eval` (held-out accuracy per task), `examples` (the README images and answers);
- `ablation`: the digits modality ablation (`m2pt train-ablation`, docs/ablation.md).

It may import `training`, `prompts_store` and `m2pt`; the trainer imports nothing from here except the scene
generator behind its `synthetic:` datasets (tests/test_import_graph.py).
"""
