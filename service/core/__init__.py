"""The inference core every front end shares: typed calls and results (``messages``), named
tensors to images and outputs (``tensor_io``), and the one path resolve → preprocess → batch
→ postprocess (``inference``). Knows no wire."""
