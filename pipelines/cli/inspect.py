"""``gradstore inspect STORE``: summarise a run store (exit 2 with one line if it is not a valid run)."""

from __future__ import annotations

import click


@click.command()
@click.argument("store")
@click.option("--verify", is_flag=True, help="Also read every committed value back (finds damaged chunks).")
def inspect(store: str, verify: bool) -> None:
    """Print steps, examples, layers, sizes on disk, schema version and configuration of STORE.

    STORE is a local path or an fsspec URL (file://, memory://, s3://...).
    """
    from gradstore.store.summary import summarize

    click.echo(summarize(store, verify=verify))
