"""The command line: the parser, the commands, and the guarded entry point."""
