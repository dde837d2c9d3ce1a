"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names what was wrong and what is allowed."""


def check_choice(what: str, value, allowed) -> object:
    """`value` if it is one of `allowed`, else a UsageError naming both."""
    if value not in allowed:
        raise UsageError(f"{what} {value!r} is unknown: allowed {', '.join(map(str, allowed))}")
    return value
