"""Built-in methods, one module each, installed as `peftbench.methods` and registered through
the `peftbench.methods` entry-point group like any plugin (see pyproject.toml). Each imports
peftbench through `peftbench.api` alone, the surface a plugin author has."""
