"""The storage layer: every byte on disk goes through here.

``atomic`` (crash-safe writes and locks), ``models`` (building and fingerprinting the base),
``ingest`` (reading and validating checkpoints lazily), ``unpickle`` (the one place that unpickles),
``basis`` (versioned basis and ledger), ``convert`` (public task-vector releases to safetensors).
"""
