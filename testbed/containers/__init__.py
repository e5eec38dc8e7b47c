"""The container testbed: agents in docker containers built with no registry (see backend.py)."""
