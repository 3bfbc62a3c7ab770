"""``python -m pipelines.cli``: the ``gradstore`` command (what torchrun starts on every rank)."""

from pipelines.cli import main

main()
