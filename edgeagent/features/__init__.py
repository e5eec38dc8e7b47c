"""Features of the daemon, one module each, started on a :class:`~edgeagent.host.FeatureHost`.

A feature is a class with ``async start(host)`` and ``async stop()``. The agent's feature
list (:data:`edgeagent.agent.FEATURES`) names each one's module, class and switch; a module
whose switch is off is never imported, so its dependencies (zeroconf, dnspython, ...) are not
loaded either. A new feature goes here and into that list.
"""
