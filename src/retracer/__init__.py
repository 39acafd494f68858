"""retracer keeps crash-retrace jobs moving and tells people when they don't.

The packages, one concept each: ``workflow`` (states/workflow.toml loaded into one machine, its guards,
effects, roles and failure policy), ``store`` (the schema, engines, bulk writes, migrations), ``apply`` (events
and admin triggers applied in one transaction, the runner, the apply workers), ``bus`` (the embedded inbox,
RabbitMQ and an in-memory stub behind one protocol), ``service`` (the serve loop, its chores and hooks),
``uploads`` (the spool), ``mail``, ``reports`` (what admins are shown), ``worker`` (core dumps), ``cli``
and ``testing``. This module names what other programs may rely on.
"""

from importlib.metadata import PackageNotFoundError, version

from retracer.errors import RetracerError

try:
    __version__ = version("retracer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["RetracerError", "__version__"]
