"""Benchmarks that state the project's speed as a ratio against a named baseline.

``train_step``, ``input_pipeline``, ``ray_overhead``, ``tracking_overhead``, ``input_storage`` and
``checkpoint_upload`` each run the project and its baseline in one process (or one run),
interleaved over several rounds, and return a ``Comparison``: the median
and spread of each, and the ratio. Its last printed line is ``NAME: ratio X.XX (project vs
baseline)``. Importing this package needs neither ray nor mlflow; ray_overhead imports ray when
it runs.
"""
