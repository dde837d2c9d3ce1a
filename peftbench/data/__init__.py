"""Tasks: the task spec (YAML schema), loading it, encoding rows into batches, metrics and preprocessors (each a registry)."""
