"""README.md tells the truth about the code: the line counts of its 'Where the lab is in the code' table
are those of the functions it names."""
import importlib
import inspect
import os
import re

import pytest

from conftest import ROOT


def table_rows():
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text.split('## Where the lab is in the code')[1].split('\n## ')[0]
    return [row for row in re.findall(r'^\| (.+?) \| `(\S+)` \| (.+?) \| ([\d +]+) \|$', section, flags=re.M)]


def source_lines(path, name):
    """Lines of function or class `name` (dotted for a method) in `path` (a .py module or the .pyx file)."""
    if path.endswith('.pyx'):
        lines = open(os.path.join(ROOT, path)).read().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f'def {name}('))
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
        while not lines[end - 1].strip():
            end -= 1
        return end - start
    obj = importlib.import_module(path[:-3])
    for part in name.split('.'):
        obj = getattr(obj, part)
    return len(inspect.getsourcelines(obj)[0])


def test_the_table_is_there():
    assert len(table_rows()) >= 20


@pytest.mark.parametrize('piece, path, names, counts', table_rows(), ids=[row[0][:40] for row in table_rows()])
def test_every_line_count_is_the_codes(piece, path, names, counts):
    names = re.findall(r'`([\w.]+)`', names)
    counts = [int(count) for count in counts.split('+')]
    assert len(names) == len(counts), piece
    assert [source_lines(path, name) for name in names] == counts, piece
