"""Scale-out on Ray Serve: N engine replicas behind one endpoint (`m2pt serve --replicas N`).

Ray is an optional dependency (`pip install -e .[cluster]`) and is imported lazily, only by the modules of
this package that talk to it (`router`, `replica`, `client`, `launch`); `affinity` (the routing policy),
`metrics`, `board` and `options` are pure Python. Nothing else in `server/` imports this package except
`server.cli`, lazily, for `--replicas`.
See docs/cluster.md.
"""
