"""The export stage: PyTorch architecture + weights → checked ONNX model → new repository version.

Imports PyTorch; the server never imports this package (the CLI does, lazily, for ``export``).
"""
