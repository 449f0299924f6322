"""beamlet.tune's implementation: hyperparameter search on beamlet's public API.

Users import ``beamlet.tune`` (or ``from beamlet import tune``), which
re-exports the public names. One concept per module:

* ``search_space``: grid_search, choice, uniform, loguniform, randint, sample_from, ...
* ``variant_generator``: expanding a config into trial configs (grid x samples, seed)
* ``search``: search algorithms: BasicVariantGenerator, the Searcher interface,
  ConcurrencyLimiter, OptunaSearch (optional extra)
* ``trainable``: function / class trainables, ``register_trainable``
* ``wrappers``: ``with_parameters`` and ``with_resources``
* ``session``: ``tune.report`` / ``get_checkpoint`` and the seed's ``reporter``, inside a trial
* ``checkpoint``: ``Checkpoint`` and how checkpoints are kept in trial directories
* ``result``: the fields every result gets; JSON/flattening helpers
* ``trial``: a trial as the driver sees it; resource requests
* ``trial_actor``: the actor that runs one trial (and, with reuse_actors, the next)
* ``experiment``: an experiment spec (the seed's ``{name: spec}``)
* ``experiment_state``: the append-only state log that ``resume`` reads
* ``stopper``: stop criteria
* ``schedulers``: per-result CONTINUE / PAUSE / STOP: FIFO, ASHA, HyperBand,
  median stopping, PBT
* ``runner``: the driver's loop over the trials' actors
* ``loggers``: callbacks; JSON, CSV and TensorBoard loggers
* ``progress``: the live status line and the final table
* ``analysis``: ExperimentAnalysis
* ``tuner``: Tuner / TuneConfig / RunConfig / ResultGrid
* ``plugins``: beamlet.tune's own plugin points (loggers, searchers, schedulers by name)
* ``api``: ``tune.run`` and ``run_experiments``
"""
