"""What a run reads back from a folder (config.json, a checkpoint's 'run' fields, results.json, lab.py's
steps.json and the outputs its report reads) is data too, read the way data.py reads data files:

    text = read_text(path, max_bytes)             # a regular file of at most max_bytes
    obj = read_json(path, schema, max_bytes)      # ... parsed with bounded nesting, checked against schema
    obj = parse_json(text, schema, where)         # JSON text already in memory (a checkpoint's fields)

A FIFO, a device such as /dev/zero, a folder, a file larger than the bound, JSON nested deeper than any file of
these scripts, or a value that does not fit the schema: each is a ReadBackError, one line naming the file,
before anything is built from it.

A schema is a type (int, float, str, bool, dict, list) or a tuple of them, {key: schema} for a dict that has
at least those keys, [schema] for a list whose every item fits, or a Number(low, high) for a finite number in
range. bool is no int here (JSON's true is no count), and an int is a float.
"""
import json
import math
import os
import stat

from errors import UserError

MAX_NESTING = 32  # deeper than any file these scripts write: only a way to exhaust the stack


class ReadBackError(UserError):
    """A file a run reads back is not what these scripts write."""


class Number:
    """A finite int or float in [low, high]."""

    def __init__(self, low=-math.inf, high=math.inf, integer=False):
        self.low, self.high, self.integer = low, high, integer

    def fits(self, value):
        kinds = (int,) if self.integer else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) \
            and self.low <= value <= self.high

    def __str__(self):
        kind = 'an integer' if self.integer else 'a finite number'
        if self.high == math.inf:
            return kind if self.low == -math.inf else f"{kind} >= {self.low:g}"
        return f"{kind} in [{self.low:g}, {self.high:g}]"


COUNT = Number(0, integer=True)


def read_bytes(path, max_bytes):
    """The bytes of the regular file at path, at most max_bytes; a ReadBackError for anything else. The file is
    opened without blocking (a FIFO would block open() forever) and checked to be a regular file first."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ReadBackError(f"{path}: cannot read ({error.strerror})") from None
    with os.fdopen(descriptor, 'rb') as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ReadBackError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise ReadBackError(f"{path}: {info.st_size} bytes, more than such a file has ({max_bytes} at most)")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:  # it grew while we read
        raise ReadBackError(f"{path}: more than {max_bytes} bytes")
    return raw


def read_text(path, max_bytes):
    try:
        return read_bytes(path, max_bytes).decode('utf-8')
    except UnicodeDecodeError as error:
        raise ReadBackError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_json(path, schema=None, max_bytes=16 << 20):
    """The JSON in the file at path, checked against schema (see the module docstring)."""
    return parse_json(read_text(path, max_bytes), schema, path)


def parse_json(text, schema, where):
    """JSON text -> the object, nested at most MAX_NESTING deep and fitting schema; a ReadBackError naming
    `where` otherwise. NaN and infinities, which Python's json accepts but JSON has not, are refused."""
    if not isinstance(text, str):
        raise ReadBackError(f"{where}: not JSON text but a {type(text).__name__}")
    if _nesting(text) > MAX_NESTING:
        raise ReadBackError(f"{where}: JSON nested more than {MAX_NESTING} deep")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except ValueError as error:  # JSONDecodeError is one
        raise ReadBackError(f"{where}: not valid JSON ({str(error).splitlines()[0][:200]})") from None
    if schema is not None:
        check(obj, schema, where)
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _nesting(text):
    """How deep the brackets of JSON text nest, strings left out: one pass, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == '\\':
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in '[{':
            depth += 1
            deepest = max(deepest, depth)
        elif char in ']}':
            depth -= 1
    return deepest


def check(value, schema, where, path=''):
    """A ReadBackError naming where, and the place inside (results.epochs[2].seconds), unless value fits schema."""
    def refuse(expected):
        shown = repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            f"a {type(value).__name__}"
        raise ReadBackError(f"{where}: {path or 'the value'} is {shown[:60]}, not {expected}")
    if isinstance(schema, Number):
        if not schema.fits(value):
            refuse(str(schema))
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            refuse('a dict')
        for key, item in schema.items():
            if key not in value:
                raise ReadBackError(f"{where}: no {key!r}" + (f" in {path}" if path else ''))
            check(value[key], item, where, f"{path}.{key}" if path else key)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            refuse('a list')
        for i, item in enumerate(value):
            check(item, schema[0], where, f"{path}[{i}]")
    else:
        kinds = schema if isinstance(schema, tuple) else (schema,)
        if float in kinds:
            kinds += (int,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            refuse(' or '.join(f"a {kind.__name__}" for kind in kinds if not (kind is int and float in kinds)))
