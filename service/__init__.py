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


def install_hint(extra: str) -> str:
    """How to add an extra to this installation. Never ``pip install 'visionserve[...]'``: an
    unrelated project of that name is on PyPI, and pip would install its code."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():  # an editable install of a checkout
        return f"pip install -e '{checkout}[{extra}]'"
    return (f"pip install '/path/to/visionserve-{package_version()}-py3-none-any.whl[{extra}]' "
            "(this project's wheel: visionserve is not on PyPI, and the PyPI project of that "
            "name is someone else's)")
