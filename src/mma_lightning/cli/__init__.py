"""Command-line entry points (Hydra apps): ``mma-train`` (:mod:`.train`) and ``mma-eval`` (:mod:`.eval`)."""
