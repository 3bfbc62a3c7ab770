"""Per-layer rules, one file per layer family; importing this package registers them.

The Hugging Face ``Conv1D`` rule (:mod:`gradstore.capture.rules.hf`) is registered lazily: it is
imported the first time a model's module has no rule while ``transformers`` is imported (a model
holding a ``Conv1D`` has imported it), so gradstore never imports the optional package itself.
"""

from gradstore.capture.registry import register_lazy
from gradstore.capture.rules import activation, conv, embedding, linear, norm, recurrent  # noqa: F401

register_lazy("transformers", "gradstore.capture.rules.hf")
