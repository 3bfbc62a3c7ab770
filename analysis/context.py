"""What a metric sees: the run, the analysis options, and the shared (cached) inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from analysis import sources

#: at most this many tracked training examples enter pairwise metrics (stiffness, confusion,
#: easy/hard, minibatch); more are sampled (seeded) and the sampling error is reported
MAX_PAIR_EXAMPLES = 512


@dataclass
class Context:
    """The inputs of every metric of one analysis (built by :func:`analysis.report.prepare`).

    Attributes
    ----------
    ds : xarray.Dataset
        The run.
    n_permutations, seed, snapshot, batch_sizes, pair_source
        The options of :func:`analysis.report.analyze`.
    max_pair_examples : int
        Most training examples in a pairwise metric; more are sampled without replacement.
    notes : list of str
        What was skipped or estimated, and why (into the results' ``notes`` attribute).
    """

    ds: xr.Dataset
    n_permutations: int = 1000
    seed: int = 0
    snapshot: int | None = None
    batch_sizes: tuple = (1, 10, 100)
    pair_source: str | None = None
    max_pair_examples: int = MAX_PAIR_EXAMPLES
    notes: list = field(default_factory=list)
    _gram: xr.DataArray | None = None
    _pairs: np.ndarray | None = None

    @property
    def train_index(self) -> np.ndarray:
        """Positions of the tracked training examples."""
        return np.flatnonzero(sources.split_mask(self.ds, "train").values)

    @property
    def pair_index(self) -> np.ndarray:
        """Positions of the examples of pairwise metrics: every training example, or a seeded sample."""
        if self._pairs is None:
            index = self.train_index
            if index.size > self.max_pair_examples:
                rng = np.random.default_rng([self.seed, 0x5A17])
                index = np.sort(rng.choice(index, size=self.max_pair_examples, replace=False))
                self.note(f"pairwise metrics use a seeded sample of {index.size} of the {self.train_index.size} "
                          f"training examples (exact over the sampled pairs; *_se is the jackknife standard error "
                          "of the sampled mean)")
            self._pairs = index
        return self._pairs

    @property
    def sampled(self) -> bool:
        """Whether pairwise metrics use a sample of the training examples."""
        return self.pair_index.size < self.train_index.size

    def gram(self) -> xr.DataArray:
        """g_i·g_j over :attr:`pair_index` from :attr:`pair_source`, (step, layer, example, example_), lazy."""
        if self._gram is None:
            self._gram = sources.layer_gram(self.ds, self.pair_source, examples=self.pair_index)
        return self._gram

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def tag(self, part: xr.Dataset, source: str | None = None) -> xr.Dataset:
        """Record ``source`` (default: the pairwise source) in each variable's attributes."""
        for name in part.data_vars:
            part[name].attrs["source"] = source or self.pair_source
        return part
