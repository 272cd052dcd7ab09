"""Generated protobuf and gRPC stubs of the interscope.v1 API (do not edit: scripts/gen_protos.py)."""
