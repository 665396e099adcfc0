"""Experiment configs: ``get_config(arg)`` files for ``python -m experiments.train``."""
