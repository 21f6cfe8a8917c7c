"""Experiments: the paper's comparisons on your own models (``evaluate``), the baselines they need
(``baselines``), and the real offline suites (``suites``). Nothing in the daemon imports this layer.
"""
