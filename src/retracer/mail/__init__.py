"""Notification mail: templates rendered from the outbox rows, delivered over SMTP or into an mbox file.

The service loop keeps one :class:`Sender` and calls ``deliver_pending()`` on each tick; cron uses
:func:`deliver_pending` (``retracer mail flush``).
"""

from retracer.mail.sender import DeliveryReport, Sender, deliver_pending

__all__ = ["DeliveryReport", "Sender", "deliver_pending"]
