"""One-line messages for command-line errors that jsonargparse reports before anything is built.

jsonargparse (with ``exit_on_error=False``) raises an ``ArgumentError`` whose message nests one
``Parser key "..."`` line per level of the option, then the innermost problem. :func:`parse_error_line`
turns it into one line naming the option as the user typed it (or the config file and line), so a missing
``--config`` file, a YAML syntax error or ``--model.init_args.sae.init_args.k abc`` read like every other
bad input: ``error: --option: what is wrong (see python train.py --help)``.
"""

from __future__ import annotations

import re
from pathlib import Path

HINT = "see python train.py --help"

_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED = re.compile(r"Expected an? (.+?)\. Got value: (.*?)(?:\. Got value: .*)?$", re.M)
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_MISSING_FILE = re.compile(r"File does not exist: '([^']+)'")
_NESTED = re.compile(r"Given value: NestedArg\(key='([^']+)', val='([^']*)'\)\s*$")
_NO_CLASS = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: --(\S+?)=")
_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)'")
_EXPECTED_TYPE = re.compile(r"Expected an? <class '(?:builtins\.)?(\w+)'>")
_LITERAL = re.compile(r"Expected an? typing\.Literal\[(.*?)\]$", re.M)
_UNLOADABLE = re.compile(r"Unable to load config '([^']+)'")
_NOT_A_PATH = re.compile(r"Expected a path but (.+) either not accessible or invalid$", re.M)


def parse_error_line(message: str, args: list[str]) -> str:
    """The one-line form of a jsonargparse error ``message`` raised while parsing ``args`` (no ``error:`` prefix)."""
    text = _describe(message, args)
    return f"{text} ({HINT})"


def _describe(message: str, args: list[str]) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    missing = _MISSING_FILE.search(message)
    if missing:
        key = _KEY.search(message)
        option = "--" + key.group(1) if key else "--config"
        return f"{option}: no such file {missing.group(1)!r}"
    if first.startswith("Problems parsing config"):
        return _yaml_problem(args) or f"--config: {first}"
    if first.startswith("Unexpected config:"):
        path = _config_holding(args, lambda data: not isinstance(data, dict))
        return f"--config {path or ''}: not a YAML mapping of options".replace(" :", ":")
    group = re.match(r"Group '([\w.]+)' does not accept option '([\w.]+)'", first)
    if group:  # an unknown key in a config file
        keys = f"{group.group(1)}.{group.group(2)}".split(".")
        path = _config_holding(args, lambda data: _holds(data, keys))
        where = f" (in --config {path})" if path else ""
        return f"--{group.group(1)}.{group.group(2)}: unknown option{where}"
    unloadable = _UNLOADABLE.search(message)
    if unloadable:  # --data FILE / --trainer FILE: a group's options from a file
        key = _KEY.search(message)
        return f"--{key.group(1) if key else 'config'}: {_file_problem(unloadable.group(1))}"
    arg = re.match(r"argument (?:-\w/)?(--[\w.]+): expected one argument", first)
    if arg:
        return f"{arg.group(1)}: expected a value"
    if first.startswith("unrecognized arguments:"):
        rest = first.split(":", 1)[1].strip()
        return f"{rest.split()[0]}: unknown option" if rest.startswith("--") else f"unrecognized arguments: {rest}"
    keys = _KEY.findall(message)
    nested = _NESTED.search(message)  # a sub-option of a class (--model.sae.k): jsonargparse names it at the end
    if keys and nested:
        option = _typed_option(f"{keys[0]}.{nested.group(1)}".replace(".init_args", ""), nested.group(2), args)
        problem = _class_problem(message)
        if problem:
            return f"{option}: {problem}"
        unknown = _UNRECOGNIZED.search(message)
        if unknown:
            owner = _CLASS_PATH.search(message)
            of = f" of {owner.group(1).rsplit('.', 1)[-1]}" if owner else ""
            return f"{option}: no such option{of}"
        want = [t for t in _EXPECTED_TYPE.findall(message) if t != "NoneType"]
        if want:
            want_name = _type_name("<class '" + want[0] + "'>")
            return f"{option}: expected {want_name}, got {nested.group(2)!r}"
    if keys:
        path = ".".join(keys)
        literals = _LITERAL.findall(message)
        if literals and "Given value:" in message:  # a Union of Literals (--trainer.precision): every choice
            given = _given(message)
            flags = ["true", "false"] if "Expected a <class 'bool'>" in message else []  # --checkpoint.save_last
            choices = ", ".join(dict.fromkeys([*flags, *(c.strip() for group in literals for c in group.split(","))]))
            return f"{_typed_option(path, given, args)}: expected one of {choices}, got {given!r}"
        bad = _NOT_ACCEPTED.search(message)
        if bad:
            return f"{_typed_option(f'{path}.{bad.group(1)}', None, args)}: no such option for this class"
        expected = _EXPECTED.search(message)
        if expected:
            want, value = _type_name(expected.group(1)), expected.group(2).strip()
            return f"{_typed_option(path, value, args)}: expected {want}, got {value!r}"
        given = _given(message)
        if nested and keys[-1] != nested.group(1):
            path = f"{path}.{nested.group(1)}"
        option = _typed_option(path.replace(".init_args", ""), given, args)
        problem = _class_problem(message)
        if problem:
            return f"{option}: {problem}"
        required = re.search(r"the following arguments are required: ([\w.]+(?:, [\w.]+)*)", message)
        if required:  # a class's argument without a default, set to null or left out (a sweep's members)
            names = ", ".join(f"--{path}.{a}" for a in required.group(1).split(", "))
            return f"{names}: required (not given, or null)"
        want = list(dict.fromkeys(t for t in _EXPECTED_TYPE.findall(message) if t != "NoneType"))
        if want == ["dict"] and given is not None:  # a mapping given as text (JSON / YAML) that does not parse as one
            return f"{option}: expected a mapping ({_yaml_error(given)}), got {given!r}"
        if want and given is not None:
            names = " or ".join(_type_name("<class '" + t + "'>") for t in want)
            return f"{option}: expected {names}, got {given!r}"
        return f"--{path}: {_KEY.sub('', _last_line(message)).lstrip(': ')}"
    return first


_NOT_SUBCLASS = re.compile(r"Import path does not correspond to a subclass of (\w+)")
_NOT_SUBCLASS_OF = re.compile(r"Expected '([\w.]+)' to be a subclass of <class '(\w+)'>")


def _class_problem(message: str) -> str | None:
    """What is wrong with a ``class_path`` (an option's or a config file's): a class its module lacks, or one of
    another kind (``torch.nn.Linear`` as the model); ``None`` if the message is not about one."""
    missing = _NO_CLASS.search(message)
    if missing:
        return f"no class {missing.group(2)!r} in {missing.group(1)}"
    other = _NOT_SUBCLASS_OF.search(message)
    if other:
        return f"{other.group(1)} is not a {other.group(2)}"
    other = _NOT_SUBCLASS.search(message)
    if other:
        given = _given(message)
        return f"{given or 'the class'} is not a {other.group(1)}"
    path = _NOT_A_PATH.search(message)  # --model VALUE, --model.sae VALUE: neither a config file nor a class
    if path and not {"float", "int", "bool", "str"} & set(_EXPECTED_TYPE.findall(message)):  # not a number's
        value = path.group(1)
        if Path(value).expanduser().exists() or "/" in value or Path(value).suffix in (".yaml", ".yml", ".json"):
            return _file_problem(value)
        return f"{value!r} is neither a class (module.Class) nor a config file"
    spec = re.search(r"Expected an import path or a subclass spec, but got (.*)$", message, re.M)
    if spec:
        return f"expected a class (module.Class) or a mapping of its options, got {_given(message) or spec.group(1)!r}"
    return None


def _given(message: str) -> str | None:
    """The outermost ``Given value:`` of a jsonargparse message (the value as the user gave it), if any."""
    found = re.findall(r"^\s*Given value: (.*)$", message, re.M)
    if not found:
        return None
    outer = found[-1].strip()
    if outer.startswith("NestedArg("):  # jsonargparse's wrapper of --model.X VALUE: the value inside
        nested = _NESTED.search(message)
        return nested.group(2) if nested else re.sub(r"\. Got value: .*$", "", found[0].strip())
    return outer


def _file_problem(value: str) -> str:
    """What is wrong with ``value`` given where a config file (or a class path) goes."""
    path = Path(value).expanduser()
    if not path.exists():
        return f"no such file {value!r}"
    return f"{value!r} is not a config file it can read (a YAML mapping of options)"


def _yaml_error(text: str) -> str:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark is not None else ""
        return f"not valid YAML/JSON{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
    return f"it reads as a {type(value).__name__}"


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``an int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    cls = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", text)
    if cls:
        name = cls.group(1).rsplit(".", 1)[-1]
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(name, name)
    lit = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if lit:
        return f"one of {lit.group(1)}"
    return text


def _typed_option(path: str, value: str | None, args: list[str]) -> str:
    """The option as the user typed it (``--model.init_args.sae.init_args.k``) if ``args`` set ``path`` to
    ``value`` (any value if None); else ``--<path>`` (the value came from a config file)."""
    plain = path.split(".")
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        name, eq, inline = a[2:].partition("=")
        given = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        parts = [p for p in name.split(".") if p != "init_args"]
        if (value is None or given == value) and (parts == plain or parts[-1:] == plain[-1:]):
            return "--" + name
    return "--" + ".".join(plain)


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message


def _yaml_problem(args: list[str]) -> str | None:
    """``--config FILE: YAML syntax error at line L, column C: problem`` for the first config that does not parse."""
    import yaml

    for path, e in _read_configs(args):
        if isinstance(e, yaml.YAMLError):
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
            if context and cmark is not None:
                problem += f" ({context} from line {cmark.line + 1}, column {cmark.column + 1})"
            return f"--config {path}: YAML syntax error{where}: {problem}"
    return None


def _read_configs(args: list[str]):
    """``(path, YAML content or the YAMLError)`` of each ``--config`` file that can be read, in order (inline configs
    and missing files are left out)."""
    import yaml

    for path in _config_paths(args):
        try:
            text = Path(path).expanduser().read_text()
        except (OSError, ValueError):
            continue
        try:
            yield path, yaml.safe_load(text)
        except yaml.YAMLError as e:
            yield path, e


def _config_paths(args: list[str]) -> list[str]:
    """The ``--config`` values of ``args`` in order (``--config F``, ``--config=F``, ``-c F``, ``-cF``)."""
    out = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-c") and not a.startswith("--") and len(a) > 2:
            out.append(a[2:].removeprefix("="))
    return out


def _config_holding(args: list[str], test) -> str | None:
    """The first ``--config`` file whose YAML passes ``test`` (the one an error is about), else the last one given."""
    import yaml

    found = (path for path, data in _read_configs(args) if not isinstance(data, yaml.YAMLError) and test(data))
    paths = _config_paths(args)
    return next(found, paths[-1] if paths else None)


def _holds(data, keys: list[str]) -> bool:
    """Whether the mapping ``data`` has the option ``keys`` (``init_args`` levels skipped)."""
    for key in keys:
        if isinstance(data, dict) and key not in data and isinstance(data.get("init_args"), dict):
            data = data["init_args"]
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True
