"""`retracer serve`: the loop that applies events and runs the chores."""

from retracer.service.loop import Service, Stats, unavailable

__all__ = ["Service", "Stats", "unavailable"]
