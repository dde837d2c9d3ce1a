"""Measured cost: the training step (`bench step`) and real cells per hour (`bench cells`, `bench tuning`)."""
