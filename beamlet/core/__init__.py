"""beamlet's core: API objects, ids, task specs, serialization, the four
interfaces, hookspecs and the plugin manager. Imports no backend."""
