"""Datasets as kohya writes them: folders, dataset_config TOML, captions, buckets, latent cache."""
