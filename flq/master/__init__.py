"""The master: worker registry, round engine, checkpoints, results, gRPC servicer and daemon."""
