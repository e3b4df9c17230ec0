"""Hydra configs of mma-lightning, shipped inside the package as ``mma_lightning.conf`` (see setup.cfg)."""
