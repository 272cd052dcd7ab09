"""Generated protobuf and gRPC stubs of the Open Inference Protocol v2 (do not edit: scripts/gen_protos.py)."""
