"""The worker: session protocol, gRPC connection with reconnects, and the daemon around them."""
