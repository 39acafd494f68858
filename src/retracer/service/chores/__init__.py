"""The service's chores, one module each, run every round in this order: the spool's uploads, the heartbeat
watchdog (so that the slots it frees are dispatched in the same round), dispatch, the outbox relay (the work
requests just dispatched), mail, and gc (at most every [gc] interval_s). ``registry.register`` adds one
without touching the serve loop."""

from retracer.service.chores import dispatch, gc, mail, relay, uploads, watchdog
from retracer.service.chores.registry import Chore, ChoreContext, register, registered, unregister

register("uploads", uploads.make)
register("watchdog", watchdog.make)
register("dispatch", dispatch.make)
register("relay", relay.Relay)
register("mail", mail.Mail)
register("gc", gc.Gc)

__all__ = ["Chore", "ChoreContext", "register", "registered", "unregister"]
