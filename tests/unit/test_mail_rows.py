"""Who is mailed, and what the mail can promise: the commands it prints and whether the upload is kept."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer.apply.applier import Applier
from retracer.mail.render import Notice, render
from retracer.mail.rows import command, upload_kept
from retracer.store.models import Mail
from retracer.testing.factories import event, submit


def plain(notice: Notice, config: cfg.Config) -> str:
    part = render(notice, config).get_body(("plain",))
    assert part is not None
    return str(part.get_content())


class TestCommand:
    def test_with_a_config_file_the_command_names_it(self, tmp_path: Path) -> None:
        """An instance run from a configuration file mails commands that name it, by its absolute path."""
        path = tmp_path / "etc" / "retracer.toml"
        path.parent.mkdir()
        path.write_text(f'[service]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
        config = cfg.load(path, environ={})
        assert command(config) == f"retracer --config {path.resolve()}"

    def test_from_the_environment_only_what_locates_the_instance(self, tmp_path: Path) -> None:
        """Without a file, the settings that say where the jobs are come along, and none holding a password."""
        config = cfg.load(environ={"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "my data"),
                                   "RETRACER__MAIL__ADMINS": "ops@example.com",
                                   "RETRACER__DATABASE__URL": "postgresql+psycopg://rt:secret@db/rt"})
        assert command(config) == f"RETRACER__SERVICE__DATA_DIR='{tmp_path / 'my data'}' retracer"

    def test_defaults_need_nothing(self) -> None:
        """An instance on the defaults is reached by the bare command."""
        assert command(cfg.load(environ={})) == "retracer"


class TestUploadKept:
    def test_kept_when_the_spool_has_it(self, config: cfg.Config) -> None:
        """An upload waiting in incoming/ or kept in failed/ can be rescued; a name that is not there cannot."""
        (config.spool_dir / "failed" / "up-1").mkdir(parents=True)
        (config.spool_dir / "incoming" / "up-2").mkdir(parents=True)
        assert upload_kept(config, "up-1") and upload_kept(config, "up-2")
        assert not upload_kept(config, "up-3")
        assert not upload_kept(config, None) and not upload_kept(config, "../failed/up-1")

    def test_a_failed_upload_not_in_the_spool_is_not_offered_for_rescue(
            self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        """An uploader's upload.failed naming an upload the spool never had: the admins' mail offers a retry,
        not a rescue that would find nothing."""
        applier = Applier(config)
        with factory() as session, session.begin():
            job = submit(applier, session)
            applier.apply_batch(session, [event("retrace.started", job, worker="bob"),
                                          event("upload.failed", job, leaf="never-uploaded", upload_log="disk full")])
        with factory() as session:
            mail = session.scalars(select(Mail).where(Mail.rationale == "Admin").limit(1)).one()
            notice = Notice.from_mail(mail)
        assert notice.context["upload_kept"] is False
        text = plain(notice, config)
        assert "is not in the spool" in text and f"retry {job}" in text
        assert f"rescue {job}" not in text and "never-uploaded" in text


class TestBackoff:
    def test_a_mail_failing_for_ever_waits_the_cap(self) -> None:
        """However many times a mail has failed, its wait is the configured cap, never an overflow."""
        from retracer.mail.sender import backoff

        config = cfg.load(environ={"RETRACER__MAIL__BACKOFF_S": "5", "RETRACER__MAIL__MAX_BACKOFF_S": "600"})
        assert [backoff(config, n).total_seconds() for n in (1, 2, 8, 1025, 10**6)] == [5, 10, 600, 600, 600]
