"""QR heads: head maps, where a model's map is found, the authors' formats, GGUF metadata,
QR-head detection, and the `heads` verbs."""
