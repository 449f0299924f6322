"""Backends: each sub-package registers its backends through the plugin hooks
(``beamlet/core/hookspecs.py``); nothing in ``beamlet.core`` imports them."""
