"""interscope_server: the gRPC analysis service (engine, attacks, model registry, servicers)."""

from __future__ import annotations

__version__ = "0.1.0"
