"""Per-family adapters: one implementation of the prompt math per model family, shared by training and
serving.

`base.ModelFamily` is the interface; `registry` maps HF architecture names to families and is the startup
gate's list of what is supported. The contract is `m2pt.families.base.ModelFamily`'s docstrings.
"""
