"""The symbol index: `retracer symbols import|lookup|package` (and `missing`, in its own module)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import Progress as Bar

from retracer.cli import cli
from retracer.cli.context import (
    AppContext,
    actor_name,
    actor_option,
    dry_run_option,
    emit_json,
    json_option,
    pass_app,
    printable,
    table,
)
from retracer.symbols.index import Found, lookup, normalise_build_id, package_files

if TYPE_CHECKING:
    from retracer.symbols.importer import ArchiveResult, ImportReport

#: More rows than this and `import` prints only the counts and the failures (a distribution's worth of
#: packages is not read as a table).
MAX_TABLE_ROWS = 200


@cli.group()
def symbols() -> None:
    """The symbol index: import packages, look up build-ids, list the build-ids jobs are missing."""


@symbols.command("import", short_help="Index the ELF files of .deb/.ddeb packages and directories.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@actor_option
@dry_run_option
@json_option
@pass_app
def import_(app: AppContext, paths: tuple[Path, ...], actor: str | None, dry_run: bool, as_json: bool) -> None:
    """Index every ELF file (program, library, debug file) of the .deb and .ddeb PATHS, and of directories
    (walked: their packages and loose ELF files; symbolic links are never followed nor indexed). Files are
    served from where they lie: do not move them after the import (importing them again where they now lie
    records the move).

    Each archive is one transaction: one that is hostile (members leaving the package root, more members or
    bytes than [symbols] max_members, max_member_bytes, max_archive_bytes allow, ELF headers lying about
    sizes, cut short, not an archive) is refused whole, with the reason, and the others still go in; the
    exit status is then 1. The same content (by SHA-256) is imported once: again, it changes nothing.
    Jobs waiting only for build-ids an import brings are released. --dry-run reads and reports, changing
    nothing.
    """
    # Imported here: libarchive and the package readers cost every other command ~60 ms of start-up.
    from retracer.symbols.archive import Limits
    from retracer.symbols.importer import import_paths

    limits = Limits.from_config(app.config)
    factory = app.factory
    show_bar = not as_json and sys.stdout.isatty()
    with _bar(show_bar) as tick:
        report = import_paths(factory, list(paths), limits, actor_name(actor), dry_run=dry_run, progress=tick)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(_import_text(report))
        for failed in report.failed:
            click.echo(f"error: {printable(failed.error)}", err=True)
    if report.failed:
        sys.exit(1)


@contextmanager
def _bar(show: bool) -> Iterator[Callable[[int, ArchiveResult | None], None] | None]:
    """A progress bar over the archives (only on a terminal: a log or a pipe gets the summary)."""
    if not show:
        yield None
        return
    with Bar(transient=True) as bar:
        task = bar.add_task("importing", total=None)

        def tick(total: int, result: ArchiveResult | None) -> None:
            if result is None:
                bar.update(task, total=total or 1)
            else:
                bar.advance(task, 1)
        yield tick


def _import_text(report: ImportReport) -> str:
    counts = report.to_dict()["counts"]
    head = "dry run: would import (nothing was changed)" if report.dry_run else "imported"
    done = "would-import" if report.dry_run else "imported"
    summary = (f"{head}: {counts[done]} archive(s), {report.to_dict()['files']} file(s); "
               f"already imported: {counts['already'] + counts['moved']} (moved: {counts['moved']}); "
               f"skipped (no build-id): {counts['skipped']}; failed: {counts['failed']}")
    if report.released:
        summary += f"\nreleased job(s): {', '.join(map(str, report.released))}"
    shown = [a for a in report.archives if a.status != "failed"]
    if not shown or len(shown) > MAX_TABLE_ROWS:
        return summary
    # FILES: what this run indexed, or for content imported before, what the index holds from it.
    rows = [[a.status, a.package, a.version, a.architecture, len(a.files) if a.indexed is None else a.indexed,
             a.path] for a in shown]
    return table(["STATUS", "PACKAGE", "VERSION", "ARCH", "FILES", "PATH"], rows) + "\n" + summary


def _found_table(found: list[Found]) -> str:
    return table(["BUILD-ID", "KIND", "PACKAGE", "VERSION", "ARCH", "MEMBER", "ARCHIVE"],
                 [[f.build_id, f.kind, f.package, f.version, f.architecture, f.member, f.archive_path]
                  for f in found])


@symbols.command("lookup", short_help="Which package holds each build-id.")
@click.argument("build_ids", nargs=-1, required=True)
@json_option
@pass_app
def lookup_(app: AppContext, build_ids: tuple[str, ...], as_json: bool) -> None:
    """The indexed files with each BUILD-ID (hex, as `readelf -n` prints it): their package, version,
    architecture, path in the package, and whether they are the program or its debug info.

    --json prints Darkserver's shape: a list of {buildid, elf, package, version, architecture, kind}.
    Exit status 1 when any BUILD-ID is not in the index (the others are still printed)."""
    wanted = list(dict.fromkeys(normalise_build_id(text) for text in build_ids))
    with app.factory() as session:
        found = lookup(session, wanted)
    missing = sorted(set(wanted) - {f.build_id for f in found}, key=wanted.index)
    if as_json:
        emit_json([f.darkserver() for f in found])
    elif found:
        click.echo(_found_table(found))
    for build_id in missing:
        click.echo(f"not in the index: {build_id} (import the package that holds it with "
                   f"`retracer symbols import`)", err=True)
    if missing:
        sys.exit(1)


@symbols.command("package", short_help="The indexed files of a package.")
@click.argument("name")
@click.argument("version", required=False)
@json_option
@pass_app
def package_(app: AppContext, name: str, version: str | None, as_json: bool) -> None:
    """Every indexed file of package NAME (of VERSION, or of every version imported), with its build-id.

    --json prints Darkserver's shape (a list of {buildid, elf, package, version, architecture, kind}).
    Exit status 1 when the index holds no file of that package."""
    with app.factory() as session:
        found = package_files(session, name, version)
    if as_json:
        emit_json([f.darkserver() for f in found])
    elif found:
        click.echo(_found_table(found))
    if not found:
        which = f"{name} {version}" if version else name
        click.echo(f"no file of package {printable(which)} is in the index (`retracer symbols import` its "
                   f".deb/.ddeb)", err=True)
        sys.exit(1)
