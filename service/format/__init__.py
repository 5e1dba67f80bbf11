"""What the export stage writes and the server reads: the model folder's file names and tensor
names, its ``config.toml``, the repository scan, Triton's model configuration. Imports only
the vocabulary modules at ``service/``'s root."""
