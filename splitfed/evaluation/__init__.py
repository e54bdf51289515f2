"""Evaluating a trained adapter: parts in one process, generation metrics, the PEFT directory format."""
