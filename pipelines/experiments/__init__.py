"""The papers' experiments, each run by ``gradstore run NAME``.

``EXPERIMENTS`` maps a name to ``(module, function, one-line description)``; the function takes the
merged configuration (``pipelines/configs/NAME.toml``) and a :class:`~pipelines.experiments.common.Context`
and returns the path of the markdown report it wrote.

Each function is wrapped by :func:`~pipelines.experiments.common.experiment`: it runs with
``ctx.folder``, the :class:`~pipelines.experiments.common.RunFolder` of ``--out`` (marker checked or
written first, folder locked), and writes every file through it.
"""

EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    "label-noise": ("pipelines.experiments.label_noise", "run", "Coherent Gradients §2: MLP under label noise"),
    "winsorize": ("pipelines.experiments.winsorize", "run", "Coherent Gradients §3: winsorized SGD under label noise"),
    "median-of-means": ("pipelines.experiments.median_of_means", "run", "Weak and Strong: M3, RM3, RA3 vs SGD"),
    "easy-hard": ("pipelines.experiments.easy_hard", "run", "Weak and Strong: easy examples generalize and cohere"),
    "coherence-evolution": ("pipelines.experiments.coherence_evolution", "run",
                            "Making Coherence…: m-coherence per layer against step, CNN and ResNet"),
}


def run_experiment(name: str, config: dict, ctx):
    import importlib

    from gradstore.errors import GradstoreError

    if name not in EXPERIMENTS:
        raise GradstoreError(f"unknown experiment {name!r}; choose one of {', '.join(sorted(EXPERIMENTS))}")
    module, func, _ = EXPERIMENTS[name]
    return getattr(importlib.import_module(module), func)(config, ctx)
