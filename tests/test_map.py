"""The map after the imports of smtpproxy.py and its section banners tell
the same story: the sections, numbered in the order they stand, each
opening with what it owns, where to enter and what it uses, none over
about 1,200 lines."""

import os
import re

SOURCE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "smtpproxy.py")
BANNER = re.compile(r"^# == (\d+)\. (.*) ==$")
MAP_ENTRY = re.compile(r"^# +(\d+)\. (.*)$")
SECTION_BUDGET = 1200


def source_lines():
    with open(SOURCE) as source:
        return source.read().splitlines()


def banners(lines):
    return [(index, int(match.group(1)), match.group(2))
            for index, match in ((index, BANNER.match(line))
                                 for index, line in enumerate(lines))
            if match]


def map_entries(lines):
    start = lines.index("# == The map ==")
    entries = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            break
        match = MAP_ENTRY.match(line)
        if match:
            entries.append((int(match.group(1)), match.group(2)))
    return entries


def test_the_banners_are_numbered_in_the_order_they_stand():
    numbers = [number for _, number, _ in banners(source_lines())]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 10


def test_the_map_lists_each_banner_by_its_number_and_title():
    lines = source_lines()
    entries = map_entries(lines)
    assert entries and entries == [(number, title)
                                   for _, number, title in banners(lines)]


def test_the_map_stands_right_after_the_imports():
    lines = source_lines()
    start = lines.index("# == The map ==")
    above = [line for line in lines[:start] if line.strip()]
    assert above[-1].startswith(("import ", "from "))


def test_each_section_says_what_it_owns_where_to_enter_and_what_it_uses():
    lines = source_lines()
    assert banners(lines)
    for index, number, title in banners(lines):
        opening = "\n".join(lines[index + 1:index + 14])
        for word in ("# Owns:", "# Enter:", "# Uses:"):
            assert word in opening, (number, title, word)


def test_no_section_is_over_its_budget():
    lines = source_lines()
    found = banners(lines)
    assert found
    ends = [index for index, _, _ in found[1:]] + [len(lines)]
    for (index, number, title), end in zip(found, ends):
        assert end - index <= SECTION_BUDGET, (number, title, end - index)


def test_no_name_is_defined_twice_at_the_top_level():
    # A second ``def _seconds`` (a configuration parser) once replaced the
    # first (the log's formatter of seconds) for the whole module: every
    # deadline's message then raised.
    import ast
    with open(SOURCE) as source:
        tree = ast.parse(source.read())
    names = [node.name for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert sorted(name for name in set(names)
                  if names.count(name) > 1) == []
