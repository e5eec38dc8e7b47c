"""gossip: SWIM + Lifeguard membership and replicated per-node state, sans-IO.

Imports nothing from ``overlay`` or ``edgeagent``; no asyncio, sockets, threads,
clocks or global randomness inside.
"""
