"""The cluster backend's transport and node daemon, over ZeroMQ.

Not built yet: see ROADMAP.md item 1. Nothing registers from here until it is."""
