"""Per-layer rules, one file per layer family; importing this package registers them.

The Hugging Face ``Conv1D`` rule (:mod:`gradstore.capture.rules.hf`) registers only when the
optional ``transformers`` package is installed; any other import failure is raised.
"""

from gradstore.capture.rules import activation, conv, embedding, linear, norm, recurrent  # noqa: F401

try:
    from gradstore.capture.rules import hf  # noqa: F401
except ImportError as exc:  # transformers not installed: no rule for its Conv1D; anything else is a bug
    if (exc.name or "").split(".")[0] != "transformers":
        raise
