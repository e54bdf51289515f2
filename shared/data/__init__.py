"""A silo's data: tokenizers, JSONL examples, label masking, padding and batching."""
