"""The mail chore: due mails delivered over the sender's connections, which it keeps between rounds."""

from __future__ import annotations

from retracer.mail.sender import Sender
from retracer.service.chores.registry import ChoreContext


class Mail:
    """Delivers due mail each round and tells the hooks what it did."""

    def __init__(self, ctx: ChoreContext) -> None:
        self.ctx = ctx
        self.sender: Sender | None = None

    def __call__(self) -> int:
        if self.sender is None:
            self.sender = Sender(self.ctx.factory, self.ctx.config)
        report = self.sender.deliver_pending()
        self.ctx.hooks.after_mail(report)
        return int(report.sent + report.digests)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


