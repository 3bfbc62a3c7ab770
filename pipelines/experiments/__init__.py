"""The papers' experiments, each run by ``gradstore run NAME``.

``EXPERIMENTS`` maps a name to ``(module, function, one-line description)``. Each module follows
:class:`pipelines.experiments.runner.Experiment` (``NAME``, declared ``CLAIMS``, ``PAPER`` settings,
``execute``); its ``run(config, ctx)`` is the one runner (:mod:`pipelines.experiments.runner`) on it,
which owns the run folder and resume, the claims, the report and, with ``seeds > 1``, the seeds.
"""

EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    "label-noise": ("pipelines.experiments.label_noise", "run", "Coherent Gradients §2: MLP under label noise"),
    "winsorize": ("pipelines.experiments.winsorize", "run", "Coherent Gradients §3: winsorized SGD under label noise"),
    "median-of-means": ("pipelines.experiments.median_of_means", "run", "Weak and Strong: M3, RM3, RA3 vs SGD"),
    "easy-hard": ("pipelines.experiments.easy_hard", "run", "Weak and Strong: easy examples generalize and cohere"),
    "coherence-evolution": ("pipelines.experiments.coherence_evolution", "run",
                            "Making Coherence…: m-coherence per layer against step, CNN and ResNet"),
}


def run_experiment(name: str, config: dict, ctx, seeds: int = 1):
    """Run experiment ``name`` (``seeds`` seeds as parallel processes when > 1); the report's path."""
    import importlib

    from gradstore.errors import GradstoreError

    if name not in EXPERIMENTS:
        raise GradstoreError(f"unknown experiment {name!r}; choose one of {', '.join(sorted(EXPERIMENTS))}")
    module, func, _ = EXPERIMENTS[name]
    if seeds > 1:
        from pipelines.experiments.runner import run_seeds

        return run_seeds(module, config, ctx, seeds)
    return getattr(importlib.import_module(module), func)(config, ctx)
