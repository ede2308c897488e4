"""taxonedge.edge: the device stage, in three layers, one subpackage each (tests/test_layers.py reads the
layers from these folders and keeps the arrows one way; no module sits directly in edge/).

kernel/ (taxonedge.edge.kernel), shared with the host (imports only itself):
    bundle, taxonomy, preprocess, signing, decode, thresholds, runtime, backends/, protocol, schemas/, files
service/ (taxonedge.edge.service), the device daemon (imports the kernel and itself, never the tools):
    daemon (composition root), source, pipeline, infer, serving, publish, outbox, mqtt, control, health,
    trigger, update, transfer, vetting, slots, config, notify, osthread
tools/ (taxonedge.edge.tools), the operator's commands (anything in edge/):
    cli, deploy, listen, inspect

docs/architecture.md maps each module; docs/extending.md says which file to touch for what.
"""
