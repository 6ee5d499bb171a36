"""Models, datasets, partitioning, local training and evaluation: FLQ's only TensorFlow code.

Importing this package (or any module in it) never imports TensorFlow: `data` and `partition` are
numpy only, and `models`, `trainer` and `device` import TensorFlow inside the functions that need
it (through `flq.learning.tfimport`), so the CLI, the codec and the master's control plane start
fast.
"""
