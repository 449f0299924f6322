"""Redis for a cluster: the control store (`control_store.RedisControlStore`,
opened by ``redis://`` URLs through the plugin in `plugin`) and a private
``redis-server`` for a head node (`server.RedisServer`).

Nothing here is imported by ``import beamlet``; the redis package is needed
only when a ``redis://`` store is opened (``pip install 'beamlet[cluster]'``)."""
