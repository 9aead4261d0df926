"""Pipeline stages: each module is one function from an input artifact and params to an output artifact.

Stages know nothing of the CLI or DVC."""
