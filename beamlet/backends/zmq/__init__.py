"""The cluster backend over ZeroMQ (issue 7).

`transport.py`: the Transport between nodes and drivers (one CURVE-authenticated
ROUTER port per node); `protocol.py`: the messages; `daemon.py`: the node
daemons (head and members) that ``beamlet start`` (`commands.py`) runs;
`jobs.py`: a node's side of the drivers; `objects.py`: objects pulled from
node to node; `backend.py`: the ``cluster``
backend (a driver). `plugin.py` registers the commands and the backend."""
