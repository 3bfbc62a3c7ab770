"""Options shared by several subcommands."""

import click

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="GRADSTORE_DATA",
    help="Folder with the four MNIST IDX files (default: $GRADSTORE_DATA, else the bundled subset).",
)
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to train and capture."
)
