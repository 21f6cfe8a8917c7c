"""The orchestration layer: the daemon and what it wires together; it holds no numerics.

``daemon`` (the fold loop), ``watcher`` (arrival detection), ``jobs`` (records, runner, processes,
Ray), ``api`` (the control socket), ``metrics`` (Prometheus), ``notify`` (systemd), ``quickstart``.
"""
