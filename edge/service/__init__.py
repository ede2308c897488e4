"""The device service: the daemon (`taxonedge run`) and its stages, from capture to the MQTT outbox,
commands, health and model deployments (daemon.py is the composition root).

It imports the kernel (taxonedge.edge.kernel) and itself; never the operator tools (taxonedge.edge.tools)
and never the CLI's errors (it raises its own; the CLI maps them to exit codes).
"""
