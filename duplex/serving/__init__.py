"""The network surface: WebSocket server, wire protocol, bounded outbox, Python client."""
