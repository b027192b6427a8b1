"""The README's tables that the code defines, written from it: the settings (gguf_serve/config.py's
SETTINGS), the endpoints (the route table, service.ROUTES, each described by its handler's docstring)
and the bench's subcommands (bench/__main__.py's SUBCOMMANDS). Each sits between marker comments,
`<!-- generated: NAME -->` and `<!-- end generated: NAME -->`, and is replaced whole.

    python tools/readme.py           # rewrite README.md
    python tools/readme.py --check   # exit 1 if README.md is not what the code says (tests/unit/test_readme.py)
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMAND = "python tools/readme.py"


def settings_table() -> str:
    from gguf_serve.config import SETTINGS

    rows = [f"| `{name}` | {s.shown or (f'`{s.default}`' if s.default is not None else 'none')} | {s.meaning} |"
            for name, s in SETTINGS.items()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


def endpoints_table() -> str:
    from gguf_serve.config import MAY_BE_PUBLIC
    from gguf_serve.service import ROUTES

    def auth(route) -> str:
        if route.public:
            return "none"
        return "key, unless `PUBLIC_PATHS` names it" if route.path in MAY_BE_PUBLIC else "key"

    rows = [f"| `{route.method} {route.template}` | {summary(route.handler)} | {auth(route)} |" for route in ROUTES]
    return "\n".join(["| endpoint | what it does | with `API_KEY` set |", "|---|---|---|", *rows])


def summary(handler) -> str:
    """A handler's docstring's first paragraph, on one line: what its route does."""
    doc = inspect.getdoc(handler)
    assert doc, f"{handler.__qualname__} has no docstring: the README's endpoint table describes a route by it"
    return " ".join(doc.split("\n\n")[0].split())


def bench_table() -> str:
    from bench.__main__ import SUBCOMMANDS

    rows = [f"| `{name}` | {what} |" for name, what in SUBCOMMANDS.items()]
    return "\n".join(["| `python -m bench ...` | what it measures |", "|---|---|", *rows])


TABLES = {"settings": settings_table, "endpoints": endpoints_table, "bench": bench_table}


def generated(text: str) -> str:
    """`text` with every table between its markers written from the code."""
    for name, table in TABLES.items():
        start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        assert pattern.search(text), f"README.md has no {start} ... {end}"
        text = pattern.sub(lambda _: f"{start}\n\n{table()}\n\n{end}", text)
    return text


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))  # this checkout's gguf_serve and bench, whatever else is installed
    text = README.read_text()
    if argv == ["--check"]:
        if generated(text) != text:
            print(f"README.md's generated tables differ from the code: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    README.write_text(generated(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
