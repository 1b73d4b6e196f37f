"""Experiments built on the harness: :mod:`sasoftmax.experiments.compare` (``sasoftmax compare``)."""
