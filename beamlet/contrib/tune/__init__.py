"""beamlet.tune's implementation: hyperparameter search on beamlet's public API.

Users import ``beamlet.tune`` (or ``from beamlet import tune``), which
re-exports the public names. One concept per module:

* ``search_space``: grid_search, choice, uniform, loguniform, randint, sample_from, ...
* ``variant_generator``: expanding a config into trial configs (grid x samples, seed)
* ``trainable``: function / class trainables, ``register_trainable``
* ``session``: ``tune.report`` and the seed's ``reporter``, inside a trial
* ``result``: the fields every result gets; JSON/flattening helpers
* ``trial``: a trial as the driver sees it; resource requests
* ``trial_actor``: the actor that runs one trial
* ``experiment``: an experiment spec (the seed's ``{name: spec}``)
* ``stopper``: stop criteria
* ``schedulers``: per-result CONTINUE / PAUSE / STOP decisions (FIFO for now)
* ``runner``: the driver's loop over the trials' actors
* ``loggers``: callbacks; JSON, CSV and TensorBoard loggers
* ``progress``: the live status line and the final table
* ``analysis``: ExperimentAnalysis
* ``plugins``: beamlet.tune's own plugin points (loggers by name)
* ``api``: ``tune.run`` and ``run_experiments``
"""
