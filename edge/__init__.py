"""taxonedge.edge: the device stage, in three layers (tests/test_layers.py keeps the arrows one way).

kernel, shared with the host (imports only itself):
    bundle, taxonomy, preprocess, signing, decode, thresholds, runtime, backends/, protocol, files
device service (the daemon; imports the kernel and itself, never the tools):
    daemon (composition root), source, pipeline, infer, serving, publish, outbox, mqtt, control, health,
    trigger, update, transfer, vetting, slots, config, notify, osthread
operator tools (commands; anything above):
    cli, deploy, listen, inspect

docs/architecture.md maps each module; docs/extending.md says which file to touch for what.
"""
