"""AXIS Stage 2: adapt the merged basis to a target task by training only its top-N singular values.

``recipe.adapt`` is the recipe (model, head, data, train, evaluate, save); ``export.export_job``
writes a finished job's full adapted weights as an open_clip state dict. The scheduler's ``adapt``
job and ``adapt --local`` call the recipe from ``service.jobs.kinds``.
"""
