"""Fault injection: kill -9, outages and hostile events against a real `retracer serve`."""
