"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names what was wrong and what is allowed."""


def check_choice(what: str, value, allowed) -> object:
    """`value` if it is one of `allowed`, else a UsageError naming both."""
    if value not in allowed:
        raise UsageError(f"{what} {value!r} is unknown: allowed {', '.join(map(str, allowed))}")
    return value


def _key_path(loc: tuple, raw) -> list[str]:
    """The part of a pydantic error location that names keys of the user's input (pydantic
    adds the names of union branches, 'constrained-int' and the like, in between)."""
    path, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path.append(str(part))
            node = node[part]
    return path


def schema_problem(err, raw: dict, model) -> tuple[str, str]:
    """(top-level key, one-line message) for a pydantic ValidationError of a user's file: of a
    union's several failures, the one about a value that reached deepest into the user's keys
    (the branch the user meant), with the key path, the value and what was wrong."""
    errors = err.errors()
    unknown_top = [e for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    about_values = [e for e in errors if e["type"] not in ("extra_forbidden", "missing")]
    # an unknown top-level key first (a typo often explains the rest), then a wrong value
    problem = unknown_top[0] if unknown_top else \
        max(about_values or errors, key=lambda e: len(_key_path(e["loc"], raw)))
    path = _key_path(problem["loc"], raw)
    top = path[0] if path else str(problem["loc"][0]) if problem["loc"] else ""
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        allowed = f": allowed {', '.join(sorted(model.model_fields))}" if len(problem["loc"]) == 1 else ""
        return top, f"unknown key {'.'.join(path)!r}{allowed}"
    if problem["type"] == "missing":
        return top, f"missing required key {'.'.join(str(x) for x in problem['loc'])!r}"
    if not path or (problem["type"] == "value_error" and message.startswith(path[-1])):
        return top, message  # a model-level check, or a message that names its key already
    return top, f"{'.'.join(path)} = {problem.get('input')!r}: {message}"
