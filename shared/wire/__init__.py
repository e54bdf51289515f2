"""The wire: message kinds and limits, the binary header and tensor frames, codecs, sockets."""
