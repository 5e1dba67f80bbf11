"""The HTTP front end: KServe v2 REST and the image endpoints (``rest``), JSON/binary tensors
to typed calls (``rest_wire``), and the OpenAPI document."""
