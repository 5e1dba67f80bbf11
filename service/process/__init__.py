"""One server process: its configuration (``server_config``), TLS, the HTTP listener and the
metrics endpoint, and ``server`` that wires every layer into a running process."""
