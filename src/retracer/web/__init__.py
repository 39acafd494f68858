"""`retracer web`: the status pages, the JSON API, Prometheus metrics and the symbol routes, one ASGI app."""
