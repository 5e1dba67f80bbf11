"""Thin gRPC servicers: wire message → typed request → core → typed result → wire message."""
