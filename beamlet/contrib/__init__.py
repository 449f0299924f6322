"""Libraries built on beamlet's public API: ``beamlet.tune`` and ``beamlet.rl``."""
