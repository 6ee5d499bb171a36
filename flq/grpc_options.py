"""gRPC channel and server options, chosen on purpose (and shared so both ends agree).

Keepalive: a worker may train for minutes without sending anything on its stream, and NATs and
firewalls on field networks drop idle TCP flows after a few minutes. So the client pings every
30 s, even between calls, and the server accepts pings that often: its minimum ping interval (20 s)
is below the client's 30 s, or it would count "strikes" and close the link with too_many_pings.
Message limits: tensors travel in chunks of at most 1 MiB, so 8 MiB leaves room for headers and
grouping without allowing a peer to make us buffer arbitrarily large messages.
"""

from __future__ import annotations

SERVICE_NAME = "flq.v1.FLQ"  # the gRPC service, as the health service names it
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CLIENT_KEEPALIVE_MS = 30_000

CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # long uploads/downloads must not stop pings
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),  # we reconnect ourselves, with jitter
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    # gRPC sets SO_REUSEPORT by default: a second master on our port would bind beside us and
    # share the connections. Off, binding an occupied port fails ("address in use", exit 2).
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 5),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
