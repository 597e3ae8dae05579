"""File formats: safetensors headers, range readers, the output writer and model sources."""
