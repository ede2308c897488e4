"""The operator tools: the device-side commands of `taxonedge` (cli.py registers run, inspect, deploy,
sign, listen) and their implementations.

They may import anything in edge/ (kernel and service) and the CLI's errors; nothing in edge/ imports them
but the `taxonedge` command (taxonedge/cli.py).
"""
