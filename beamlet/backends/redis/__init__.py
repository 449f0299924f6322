"""The Redis ControlStore (the cluster's GCS).

Not built yet: see ROADMAP.md item 1. Nothing registers from here until it is."""
