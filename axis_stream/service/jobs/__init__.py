"""Adaptation jobs: durable records in SQLite, dispatched by APScheduler, each run in its own process.

The SQLite table ``<state_dir>/jobs.sqlite`` (``records``) is the source of truth: APScheduler 3
forgets a one-shot job once it is submitted and stores no results, so here it only decides when a
queued job starts (a thread pool of ``scheduler.gpu_slots`` workers) and fires the cron triggers
(``runner``). Each job runs in a fresh ``spawn`` child (CUDA-safe) in its own process group
(``process``), or as a Ray task (``ray``), so a crash, an out-of-memory kill or a cancel cannot take
the daemon down. ``kinds`` maps job kinds to their functions, ``control`` serves the control-API
operations, ``client`` holds the CLI's loops. Times in records are UNIX seconds (floats).
"""
