"""Evaluation metrics shared by training-time validation and the standalone evaluation scripts."""
