"""Data, models, training, experiments and the `gradstore` command line."""
