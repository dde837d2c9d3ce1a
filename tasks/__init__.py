"""Built-in task specs (one YAML file per task) and their data, installed as `peftbench.tasks`."""
