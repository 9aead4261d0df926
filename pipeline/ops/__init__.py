"""Running stages: memory limits and sampling, supervision, child processes, the artifact store."""
