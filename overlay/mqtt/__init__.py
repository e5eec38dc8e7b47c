"""MQTT for the mesh, sans-IO: packets, codec, broker core, mesh routing."""
