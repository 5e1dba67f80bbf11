"""The gRPC front end: our VisionService and KServe v2's GRPCInferenceService (each servicer
beside its wire module), strict decoding, the wire limits counted before protobuf parses, and
the mapping from our error codes to gRPC status codes."""
