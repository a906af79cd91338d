"""Markdown table of every main.py flag, generated from the parser so the flags page stays true.

usage:
    python scripts/flags_table.py                 print the table
    python scripts/flags_table.py --write         replace the table in docs/flags.md
    python scripts/flags_table.py --check         exit 1 if docs/flags.md's table is stale
    (--write FILE / --check FILE: another markdown file)
The page holds the table between the lines ``<!-- flags:start -->`` and ``<!-- flags:end -->``.
"""
import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli.config import get_args_parser  # noqa: E402
from cli.roles import flag_roles  # noqa: E402

START, END = "<!-- flags:start -->", "<!-- flags:end -->"
FLAGS_PAGE = os.path.join(ROOT, "docs", "flags.md")

def _default(action: argparse.Action) -> str:
    value = action.default
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, float) and math.isclose(value, 2 * math.pi):
        return "2π"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value) if value != "" else '""'


def _values(action: argparse.Action) -> str:
    """What the flag takes: its choices, a type name, or nothing for a switch."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch (`--no-…` to turn off)"
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return " | ".join(str(c) for c in action.choices)
    kind = getattr(action.type, "__name__", "str") if action.type else "str"
    if action.nargs in ("+", "*"):
        return f"{kind} list"
    if isinstance(action.nargs, int):
        return f"{action.nargs} × {kind}"
    return kind


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flags_table() -> str:
    """One table per argument group, in the parser's order; the role column is each flag's role
    (cli/roles.py: what a resume or an evaluation of a checkpoint does with it)."""
    parser = get_args_parser()
    roles = flag_roles(parser)
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = {"positional arguments": "general", "options": "general"}.get(group.title, group.title)
        lines += [f"**{title}**", "", "| flag | values | default | role | description |", "|---|---|---|---|---|"]
        for action in actions:
            names = ", ".join(f"`{s}`" for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse.BooleanOptionalAction):
                names = ", ".join(f"`{s}`" for s in action.option_strings if not s.startswith("--no-"))
            lines.append(f"| {names} | {_escape(_values(action))} | {_escape(_default(action))} | "
                         f"{roles[action.dest]} | {_escape(action.help or '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, table: str, path: str) -> str:
    """``text`` with the table between the markers replaced by ``table``; ``path`` names it in the error."""
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", metavar="FILE", nargs="?", const=FLAGS_PAGE,
                        help="replace the table in FILE (default docs/flags.md)")
    parser.add_argument("--check", metavar="FILE", nargs="?", const=FLAGS_PAGE,
                        help="exit 1 if FILE's table (default docs/flags.md) is stale")
    opts = parser.parse_args()
    table = flags_table()
    if opts.write:
        with open(opts.write) as f:
            text = f.read()
        with open(opts.write, "w") as f:
            f.write(replace_block(text, table, opts.write))
        return 0
    if opts.check:
        with open(opts.check) as f:
            text = f.read()
        if replace_block(text, table, opts.check) != text:
            print(f"{opts.check}: the flags table is stale; run python scripts/flags_table.py --write {opts.check}",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
