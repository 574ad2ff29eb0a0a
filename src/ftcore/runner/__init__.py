"""What the fine-tuning recipes share: building the run's parts from config, and the training loop.

The numerics (loss normalisation, clipping, schedules, checkpoint I/O) live in `ftcore.training`;
this package wires them into the steps a recipe runs, so the recipes stay thin and cannot drift.
"""
