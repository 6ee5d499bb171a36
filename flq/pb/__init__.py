"""Generated protobuf and gRPC stubs (see tools/gen_proto.py)."""
