"""AXIS Stage 2: adapt the merged basis to a target task by training only its top-N singular values.

``run_adapt(params, ctx)`` is the scheduler's ``adapt`` job; ``run_local`` runs it in the foreground;
``export_job`` writes a finished job's full adapted weights as an open_clip state dict.
"""

from axis_stream.adapt.export import export_job
from axis_stream.adapt.recipe import run_adapt, run_local

__all__ = ["export_job", "run_adapt", "run_local"]
