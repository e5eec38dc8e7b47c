"""edgeagent package."""
