"""``lepton build``: many models x targets from one build file, on a local process pool or a Ray cluster, with a cache.

``buildfile`` (load and validate), ``cache`` (content-addressed, LRU), ``worker`` (one compile),
``pool`` and ``ray_engine`` (engines), ``driver`` (dispatch, seal, write), ``summary`` (table, JSON, CI).
"""
