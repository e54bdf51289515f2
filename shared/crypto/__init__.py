"""Keys, the per-round handshake, sealed frames, operator certificates, the key directory, secure aggregation."""
