"""The kernel: the contract the host and the device share (bundle format, taxonomy, preprocessing,
signing, decoding, thresholds, the interpreter runtime and its backends/, the wire protocol and its
schemas/, atomic files).

It imports only itself (and third-party libraries): never edge/'s service or tools, never the CLI,
never train/ or convert/. train/ and convert/ import this layer and nothing else of edge/.
"""
