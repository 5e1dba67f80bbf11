"""Computing one model version: the backends (ONNX Runtime, OpenVINO, TensorRT), the dynamic
batcher, decoding and preprocessing, postprocessing. Knows no wire, no router, no repository
sync: it imports ``format`` and the vocabulary only."""
