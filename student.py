"""A student's solution of the lab: its definitions loaded without running it, and its code run in a child.

    layers = student.load_layers('submissions/ana')   # ana/layers.py's classes, for train.py --layers
    module, problems = student.load('submissions/ana/layers.py', salvage=True)   # check_solution.py

A student's file is often a script: it loads CIFAR-10 and trains when it is imported. load() takes what a
check needs from it without running that. Of the file's top-level statements it executes the imports, the
functions, the classes and the simple assignments (constants, names, arithmetic on them, and the device
idiom `device = 'cuda' if torch.cuda.is_available() else 'cpu'`); everything else there is dropped, the
`if __name__ == '__main__':` block with it. Also:
  - an import of im2col_cython, from wherever (`from cython_dir.im2col_cython import ...`), gets this
    project's build (im2col.py): the students' own copies do not build on Cython 3, and the layout is the
    course's. Nothing is imported from the student's folder, so no compiled file of theirs is loaded;
  - an import that fails (a package not installed here, the student's own helper module) binds its names
    to Unavailable placeholders: the file still loads, and only code that uses them fails, saying why;
  - with salvage=True a syntax error costs only what holds it: a method that does not parse becomes one
    that raises the SyntaxError, a class or function that does not parse is Unavailable, and a statement
    between them is dropped. Each one is a Problem;
  - this project's own layers.py and fast_layers.py are imported as the modules they are (they only set
    themselves up at import).

Child runs student code in a forked process with a memory limit, in a temporary working folder, with its
output discarded and a time limit on each silence, so that a hang, os._exit, a crash or a memory bomb in one
method ends that child only. This isolates mistakes, not malice: a submission that means harm can still
reach the files and the network of the user running it (run untrusted submissions in a container).
"""
import ast
import collections
import contextlib
import importlib
import os
import pickle
import re
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import types

import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
COURSE_CLASSES = ('Convolution', 'MaxPooling', 'Flatten', 'FC', 'ReLU', 'SoftmaxCrossEntropyWithLogits',
                  'L2Regularizer', 'RegularizedLoss')
PROJECT_MODULES = ('layers', 'fast_layers')   # imported as they are when a path names one of them here
# The only calls an assignment kept from the top level may make: asking for the device, nothing that loads or trains.
SAFE_CALLS = {'torch.device', 'torch.cuda.is_available', 'torch.backends.mps.is_available'}

Problem = collections.namedtuple('Problem', 'line message names')   # names: the top-level names it cost


class UnavailableError(Exception):
    """Raised by any use of an Unavailable name."""


class Unavailable:
    """Stands for a name that a student's file binds but that could not be had: a failed import, or a
    statement that raised or did not parse. Calling it, reading an attribute of it or subclassing it raises
    UnavailableError with the reason."""

    def __init__(self, name, reason):
        object.__setattr__(self, '_reason', f"{name} is unavailable: {reason}")

    def __getattr__(self, attribute):   # also __mro_entries__, when a class statement subclasses it
        raise UnavailableError(self._reason)

    def __call__(self, *args, **kwargs):
        raise UnavailableError(self._reason)

    def __repr__(self):
        return f"<{self._reason}>"


# ----------------------------------------------------------------------------- finding and loading the files

def layers_file(path):
    """The layers.py a path names: the file itself, or the layers.py in a folder. UserError if there is none."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'layers.py')):
            raise cli.UserError(f"{path}: no layers.py in this folder")
        return os.path.join(path, 'layers.py')
    if not os.path.isfile(path):
        raise cli.UserError(f"{path}: no such file or folder")
    if not path.endswith('.py'):
        raise cli.UserError(f"{path}: not a .py file")
    return path


def load_layers(path):
    """The course's classes from a student's layers.py (or the folder holding it), for train.py --layers.

    Returns a module object holding the file's definitions (see the module docstring), with the eight classes
    of the course's layers.py: Convolution, MaxPooling, Flatten, FC, ReLU, SoftmaxCrossEntropyWithLogits,
    L2Regularizer and RegularizedLoss. A bad path, a file that does not parse, a definition that raises or a
    missing class is a one-line cli.UserError.
    """
    filename = layers_file(path)
    try:
        module, problems = load(filename)
    except SyntaxError as error:
        raise cli.UserError(f"{filename}:{error.lineno}: {error.msg}") from None
    except (OSError, ValueError) as error:   # ValueError: not UTF-8 (UnicodeDecodeError), a null byte
        raise cli.UserError(f"{filename}: cannot read it ({error})") from None
    if problems:
        raise cli.UserError(f"{filename}:{problems[0].line}: {problems[0].message}")
    missing = [name for name in COURSE_CLASSES if not isinstance(getattr(module, name, None), type)]
    if missing:
        raise cli.UserError(f"{filename} defines no class {', '.join(missing)} (the course's layers.py has "
                            f"{', '.join(COURSE_CLASSES)})")
    return module


@contextlib.contextmanager
def blamed(module):
    """Inside the block, an exception raised in the code of a student's module (load_layers) becomes one line
    naming its file and line, as a UserError: train.py --layers PATH runs a student's code, and a mistake there
    is the student's to find, not a traceback of this project."""
    try:
        yield
    except (cli.UserError, KeyboardInterrupt):
        raise
    except Exception as error:
        if getattr(module, '__file__', None) is None or module.__name__ in PROJECT_MODULES:
            raise
        where = where_it_failed(error, [module.__file__]) or os.path.basename(module.__file__)
        raise cli.UserError(f"{where}: {type(error).__name__}: {one_line(error)} (raised in or after this line "
                            f"of {module.__file__})") from None


def load(path, salvage=False):
    """(module, problems): the definitions of the student's file at `path` (the module docstring says which),
    executed in a fresh module object that no other import sees. SyntaxError when salvage is False and the
    file does not parse; problems lists what could not be parsed or executed."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in PROJECT_MODULES and os.path.realpath(os.path.dirname(path)) == os.path.realpath(ROOT):
        return importlib.import_module(stem), []
    source = open(path, encoding='utf-8').read()
    tree, problems = parse(source, path, salvage)
    module = types.ModuleType(f'student.{stem}')   # a name no import of the project can collide with
    module.__file__ = path
    problems += _execute(module, [_redirect_im2col(node) for node in definitions(tree.body)], path)
    return module, problems


def defines(path, name):
    """Whether the file at `path` defines the function or class `name` at its top level (read, not run)."""
    try:
        tree, _ = parse(open(path, encoding='utf-8').read(), path, salvage=True)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name
               for node in tree.body)


# ----------------------------------------------------------------------------- parsing, with salvage

def parse(source, path, salvage):
    """(ast.Module, problems). Without salvage, SyntaxError if the file does not parse. With it, the file is
    parsed a top-level chunk at a time and a chunk that does not parse is salvaged (_salvage)."""
    try:
        return ast.parse(source, path), []
    except SyntaxError:
        if not salvage:
            raise
    lines = source.splitlines(keepends=True)
    body, problems = [], []
    for start, end, parsed, error in _parsed_chunks(lines, _chunks(lines, range(len(lines)), indent=''), path):
        if error is None:
            body += parsed.body
        else:
            nodes, problem = _salvage(lines, start, end, path, error)
            body += nodes
            problems.append(problem)
    return ast.Module(body=body, type_ignores=[]), problems


def _parse_lines(lines, start, end, path, keep=(), suffix=''):
    """Parses lines[start:end] (and the lines in `keep`) where they are in the file, so that line numbers
    stay true; `suffix` is added after them."""
    text = ''.join(line if start <= i < end or i in keep else '\n' for i, line in enumerate(lines[:end]))
    return ast.parse(text + suffix, path)


def _parsed_chunks(lines, chunks, path, indent='', keep=(), merge=3):
    """(start, end, ast.Module or None, SyntaxError or None) for each chunk. A chunk that does not parse is
    tried joined with up to `merge` chunks after it, since a guessed boundary may fall inside a docstring; a
    def or class that still does not parse takes the chunks up to the next def, class or decorator."""
    i = 0
    while i < len(chunks):
        start, end = chunks[i]
        error = None
        for extra in range(min(merge, len(chunks) - 1 - i) + 1):
            try:
                parsed = _parse_lines(lines, start, chunks[i + extra][1], path, keep)
            except SyntaxError as failure:
                error = error or failure
                continue
            yield start, chunks[i + extra][1], parsed, None
            i += extra + 1
            break
        else:
            i += 1
            if _defined_name(lines, start, end, indent):
                while i < len(chunks) and not _DEFINITION.match(lines[chunks[i][0]], len(indent)):
                    i += 1
            yield start, chunks[i - 1][1], None, error


_DEFINITION = re.compile(r"(async\s+def|def|class)\b|@|if\s+__name__")
# How a statement's first line begins: a def, class, import, decorator, control statement or assignment.
_STATEMENT = re.compile(r"(async\s+def|def|class|import|from|if|for|while|with|try)\b|@"
                        r"|[A-Za-z_][\w.]*(\s*,\s*[A-Za-z_][\w.]*)*\s*(:[^=]+)?[-+*/%&|^]?=(?!=)")


def _chunks(lines, numbers, indent):
    """(start, end) of the statements at `indent` among the line numbers `numbers`, found by how their first
    lines begin (a guess, good enough for code that almost parses). A decorator stays with what it decorates;
    lines before the first statement are a chunk of their own."""
    starts = []
    for i in numbers:
        line = lines[i]
        if line.startswith(indent) and not line[len(indent):len(indent) + 1].isspace() \
                and _STATEMENT.match(line, len(indent)):
            after_decorator = starts and all(lines[j].startswith(indent + '@') or not lines[j].strip()
                                             for j in range(starts[-1], i))
            if not after_decorator:
                starts.append(i)
    if not numbers:
        return []
    if not starts or starts[0] > numbers[0]:
        starts.insert(0, numbers[0])
    return list(zip(starts, starts[1:] + [numbers[-1] + 1]))


def _has_code(lines, start, end):
    return any(line.strip() and not line.lstrip().startswith('#') for line in lines[start:end])


def _defined_name(lines, start, end, indent=''):
    """The name a def or class among lines[start:end] (after its decorators) defines, or None."""
    for line in lines[start:end]:
        match = re.match(r"(async\s+def|def|class)\s+([A-Za-z_]\w*)", line[len(indent):])
        if match:
            return match.group(2)
        if not line[len(indent):].startswith('@'):
            return None
    return None


def _salvage(lines, start, end, path, error):
    """(nodes, Problem) for a chunk of top-level lines that does not parse: the class, if only some of its
    methods fail (those then raise their SyntaxError); else an Unavailable for the name the chunk defines;
    else nothing."""
    message = f"SyntaxError: {error.msg} (line {error.lineno})"
    name = _defined_name(lines, start, end)
    if name and lines[start].startswith('class '):
        node = _salvage_class(lines, start, end, path)
        if node is not None:
            broken = [item for item in node.body if getattr(item, 'syntax_error', None)]
            if broken:
                message, line = broken[0].syntax_error, broken[0].lineno
            return [node], Problem(line if broken else error.lineno, message,
                                   {f"{name}.{item.name}" for item in broken})
    if name is None:
        return [], Problem(error.lineno, message, set())
    placeholder = ast.parse(f"{name} = _unavailable({name!r}, {message!r})").body[0]
    ast.increment_lineno(placeholder, start)
    placeholder.salvaged = True
    return [placeholder], Problem(error.lineno, message, {name})


def _salvage_class(lines, start, end, path):
    """The class at lines[start:end] with each of its methods parsed alone, one that does not parse replaced
    by a method raising its SyntaxError; None if its first line or a statement other than a def fails."""
    code = [i for i in range(start + 1, end) if _has_code(lines, i, i + 1)]
    if not code:
        return None
    indent = lines[code[0]][:len(lines[code[0]]) - len(lines[code[0]].lstrip())]
    try:
        header = _parse_lines(lines, start, start + 1, path, keep=set(), suffix=indent + 'pass\n').body[0]
    except SyntaxError:
        return None
    header.body = []
    chunks = [chunk for chunk in _chunks(lines, range(start + 1, end), indent) if _has_code(lines, *chunk)]
    for method_start, method_end, parsed, error in _parsed_chunks(lines, chunks, path, indent, keep={start}):
        if error is None:
            header.body += parsed.body[0].body
            continue
        name = _defined_name(lines, method_start, method_end, indent)
        if name is None:
            return None
        header.body.append(_raising_method(name, f"SyntaxError: {error.msg} (line {error.lineno})", error.lineno))
    return header


def _raising_method(name, message, line):
    node = ast.parse(f"def {name}(self, *args, **kwargs):\n    raise SyntaxError({message!r})").body[0]
    ast.increment_lineno(node, line - 1)
    node.syntax_error = message
    return node


# ----------------------------------------------------------------------------- what runs

def definitions(statements):
    """The statements of a list (the file's top level) that load() executes: imports, functions, classes and
    simple assignments; inside a try block (an optional import) or an if on a simple test (the device), the
    same of theirs. `if __name__ == '__main__':` goes whole."""
    kept = []
    for node in statements:
        if getattr(node, 'salvaged', False) or isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef,
                                                                 ast.AsyncFunctionDef, ast.ClassDef)):
            kept.append(node)
        elif isinstance(node, ast.Expr):   # a docstring stays; any other expression is a call that does something
            kept += [node] if isinstance(node.value, ast.Constant) else []
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is not None and all(map(_is_name_target, targets)) and _is_simple(node.value):
                kept.append(node)
        elif isinstance(node, ast.Try):
            handlers = [ast.copy_location(ast.ExceptHandler(type=handler.type, name=handler.name,
                                                            body=_block(handler.body)), handler)
                        for handler in node.handlers]
            kept.append(ast.copy_location(ast.Try(body=_block(node.body), handlers=handlers,
                                                  orelse=definitions(node.orelse),
                                                  finalbody=definitions(node.finalbody)), node))
        elif isinstance(node, ast.If) and _is_simple(node.test) and '__name__' not in ast.unparse(node.test):
            kept.append(ast.copy_location(ast.If(test=node.test, body=_block(node.body),
                                                 orelse=definitions(node.orelse)), node))
    return kept


def _block(statements):
    """definitions(statements), with a `pass` where none is left (a block may not be empty)."""
    return definitions(statements) or [ast.copy_location(ast.Pass(), statements[0])]


def _is_name_target(target):
    return isinstance(target, ast.Name) or (isinstance(target, ast.Tuple) and all(
        isinstance(element, ast.Name) for element in target.elts))


def _is_simple(value):
    """Literals, names and attributes, with operators, subscripts and conditionals on them; no call but
    SAFE_CALLS, no lambda, no comprehension."""
    for node in ast.walk(value):
        if isinstance(node, ast.Call):
            if ast.unparse(node.func) not in SAFE_CALLS:
                return False
        elif isinstance(node, (ast.Lambda, ast.comprehension, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            return False
    return True


def _redirect_im2col(node):
    """An import of im2col_cython, from wherever, made an import of this project's im2col.py."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[-1] == 'im2col_cython':
        return ast.copy_location(ast.ImportFrom(module='im2col', names=node.names, level=0), node)
    if isinstance(node, ast.Import):
        names = [ast.alias(name='im2col', asname=alias.asname or 'im2col_cython')
                 if alias.name.split('.')[-1] == 'im2col_cython' and (alias.asname or '.' not in alias.name)
                 else alias for alias in node.names]
        return ast.copy_location(ast.Import(names=names), node)
    return node


def _execute(module, statements, path):
    """Executes each statement in module's namespace; one that raises binds its names to Unavailable (a
    failed import is no problem until a name it binds is used; anything else is a Problem)."""
    namespace = module.__dict__
    namespace['_unavailable'] = Unavailable
    problems = []
    for node in statements:
        try:
            exec(compile(ast.Module(body=[node], type_ignores=[]), path, 'exec'), namespace)
        except (Exception, SystemExit) as error:
            where = f"{os.path.basename(path)}:{node.lineno}"
            reason = f"{type(error).__name__}: {one_line(error)} ({where})"
            names = _bound_names(node)
            for name in names:
                namespace[name] = Unavailable(name, reason)
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                problems.append(Problem(node.lineno, reason, names))
    del namespace['_unavailable']
    return problems


def _bound_names(node):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name.split('.')[0]) for alias in node.names if alias.name != '*'}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    return {name.id for name in ast.walk(node) if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store)}


def one_line(error, limit=300):
    """The text of an exception (or anything) as one line of at most `limit` characters."""
    text = ' '.join(str(error).split())
    return text if len(text) <= limit else text[:limit] + '...'


def where_it_failed(error, files):
    """'layers.py:123': the innermost frame of the exception's traceback in one of `files` (paths); '' if none."""
    wanted = {os.path.realpath(path) for path in files}
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.realpath(frame.filename) in wanted]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ''


# ----------------------------------------------------------------------------- the child process

class Child:
    """function(send) run in a forked child process, as a context manager; send(obj) hands a picklable
    object to the parent, which reads them with messages().

    The child runs in a temporary working folder (removed afterwards), in its own process group, with
    stdin, stdout and stderr on /dev/null, no core dumps, and its address space limited to what the parent
    had plus memory_bytes (a larger allocation raises MemoryError there). The paths it uses must be absolute.
    A child still running when the block is left is killed, with what it started.
    """

    def __init__(self, function, memory_bytes):
        self.function, self.memory_bytes = function, memory_bytes
        self.ending = None   # after messages(): None if the child finished, else how it ended, in words
        self.timed_out = False

    def __enter__(self):
        self.folder = tempfile.mkdtemp(prefix='check-solution-')
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:   # the child: never returns
            os.close(read)
            self._run_child(write)
        os.close(write)
        self._pipe, self._buffer = read, b''
        return self

    def _run_child(self, pipe):
        def send(obj):
            data = pickle.dumps(obj)
            data = struct.pack('<Q', len(data)) + data
            while data:
                data = data[os.write(pipe, data):]
        status = 0
        try:
            os.setpgrp()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDWR)
            for descriptor in (0, 1, 2):
                os.dup2(null, descriptor)
            os.chdir(self.folder)
            _limit_memory(self.memory_bytes)
            self.function(send)
        except BaseException:   # our own code failed: messages() raises it in the parent
            status = 70
            try:
                send(('internal error', traceback.format_exc()))
            except BaseException:
                pass
        finally:
            os._exit(status)

    def messages(self, timeout, total=None):
        """Yields what the child sends, until it ends. The child may be silent for `timeout` seconds at most
        and run `total` seconds in all; past either it is killed. Sets self.ending."""
        started = last = time.monotonic()
        while True:
            while len(self._buffer) >= 8:
                size, = struct.unpack('<Q', self._buffer[:8])
                if len(self._buffer) < 8 + size:
                    break
                message, self._buffer = pickle.loads(self._buffer[8:8 + size]), self._buffer[8 + size:]
                last = time.monotonic()
                if isinstance(message, tuple) and message[:1] == ('internal error',):
                    raise RuntimeError(f"the child process failed:\n{message[1]}")
                yield message
            now = time.monotonic()
            deadline = min(last + timeout, started + total if total else float('inf'))
            if now >= deadline:
                self._kill()
                self.timed_out = True
                silent = now - last >= timeout
                self.ending = f"no answer within {timeout:g} s" if silent else f"still running after {total:g} s"
                return
            ready, _, _ = select.select([self._pipe], [], [], deadline - now)
            if ready:
                chunk = os.read(self._pipe, 1 << 16)
                if chunk:
                    self._buffer += chunk
                    continue
                self.ending = _how_it_ended(os.waitpid(self.pid, 0)[1])
                self.pid = None
                return

    def _kill(self):
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, signal.SIGKILL)
                break
            except (ProcessLookupError, PermissionError):
                continue
        os.waitpid(self.pid, 0)
        self.pid = None

    def __exit__(self, *exc_info):
        if self.pid is not None:
            self._kill()
        os.close(self._pipe)
        shutil.rmtree(self.folder, ignore_errors=True)


def _how_it_ended(status):
    if os.WIFSIGNALED(status):
        return f"the process was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    return None if code == 0 else f"the process exited with status {code}"


def _limit_memory(extra_bytes):
    """Caps the address space at the current one plus extra_bytes (Linux; elsewhere no cap)."""
    import resource   # here: Unix only, like os.fork, and load_layers works without it
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        with open('/proc/self/statm') as f:
            current = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return
    limit = current + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
