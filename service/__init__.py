"""visionserve serving path: repository, registry, batching, backends, gRPC API, metrics.

Nothing under this package imports PyTorch; the export stage (``visionserve.export``) is the
only place that does, and the CLI imports it lazily for export commands only.
"""
