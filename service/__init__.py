"""visionserve serving path: repository, registry, batching, backends, gRPC API, metrics.

Nothing under this package imports PyTorch; the export stage (``visionserve.export``) is the
only place that does, and the CLI imports it lazily for export commands only.
"""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed distribution's version (``visionserve --version``, KServe ServerMetadata)."""
    try:
        return version("visionserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
