"""Per-layer rules, one file per layer family; importing this package registers them."""

from gradstore.capture.rules import conv, embedding, linear, norm, recurrent  # noqa: F401
