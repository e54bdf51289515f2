"""Run state kept on the server side: the Redis registry, round checkpoints, durable files, the run config."""
