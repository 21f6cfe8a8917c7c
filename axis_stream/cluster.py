"""Joining a Ray cluster: shared by the daemon's Ray executor and ``axis-stream evaluate``'s.

Ray is an optional dependency (``pip install 'axis-stream[ray]'``), imported only when joining.
"""

from __future__ import annotations

import logging
import signal
import threading

from axis_stream.config import RayConfig
from axis_stream.errors import AxisError, ConfigError, first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'axis-stream[ray]' (Ray >= 2.9, on this machine and on every worker)"


def connect(settings: RayConfig, key: str, local_cpus: int | None = None):
    """Import Ray and join the cluster at ``settings.address`` (once per process); returns the ``ray`` module.

    The address ``"local"`` starts a Ray instance here instead, with ``local_cpus`` CPUs (default:
    all) and no dashboard. Without Ray installed this is a ``ConfigError`` naming ``key`` and what to install.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(f'{key} = "ray" needs Ray, which is not installed: {INSTALL_HINT}') from None
    if not ray.is_initialized():
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            local = {"num_cpus": local_cpus, "include_dashboard": False} if settings.address == "local" else {}
            ray.init(address=settings.address, log_to_driver=True, **local)
        except ConnectionError as exc:
            raise AxisError(f"cannot join the Ray cluster at {settings.address!r}: {first_line(exc, limit=None)}") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)   # ray.init installs its own; the daemon's stops it cleanly
        log.info("joined the Ray cluster at %s: %s", settings.address, ray.cluster_resources())
    return ray
