"""The cluster backend over ZeroMQ (issue 7).

`transport.py`: the Transport between nodes and drivers (one CURVE-authenticated
ROUTER port per node). The node daemon is not built yet: nothing registers from
here until it is."""
