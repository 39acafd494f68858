"""`retracer serve`: the loop (``loop``), its chores (``chores``), the hooks subscribers use (``hooks``) and
the counters it keeps (``stats``)."""

from retracer.service.hooks import Hooks
from retracer.service.loop import Service
from retracer.service.stats import Stats

__all__ = ["Hooks", "Service", "Stats"]
