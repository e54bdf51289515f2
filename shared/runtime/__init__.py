"""What a running role needs around its job: settings and CLI options, logs, metrics, exit codes, fail points."""
