"""mma-lightning's Hydra launcher plugin: ``hydra/launcher=packed`` (see :mod:`.packed_launcher`)."""
