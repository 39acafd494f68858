"""Notification mail: the mail rows a transition writes, rendered from templates/email/ and delivered over
SMTP or into an mbox file.

The service's mail chore keeps one :class:`Sender` and calls ``deliver_pending()`` each round; cron uses
:func:`deliver_pending` (``retracer mail flush``).
"""

from retracer.mail.sender import DeliveryReport, Sender, deliver_pending

__all__ = ["DeliveryReport", "Sender", "deliver_pending"]
