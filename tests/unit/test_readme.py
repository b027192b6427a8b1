"""The docs that the code defines can't drift from it: README.md's settings, endpoint and bench
tables are what tools/readme.py writes from the code, every setting the code reads is one of them,
and both layout tables (README.md, docs/architecture.md) name every module of gguf_serve/ and no other."""

import re

from conftest import ROOT
from gguf_serve.config import SETTINGS
from tools import readme


def test_the_generated_tables_are_what_the_code_says():
    text = (ROOT / "README.md").read_text()
    assert readme.generated(text) == text, f"README.md's generated tables differ from the code: run `{readme.COMMAND}`"


# How the package reads a setting: env.get("NAME"...), os.environ.get("NAME"...), env["NAME"], _int(env, "NAME"...),
# _float(env, "NAME"), "NAME" in env
READ = re.compile(r'(?:environ|env)(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"|_(?:int|float)\(env, "([A-Z][A-Z0-9_]+)"'
                  r'|"([A-Z][A-Z0-9_]+)" (?:not )?in (?:os\.)?env')


def test_every_setting_the_code_reads_is_in_the_table():
    read = {name for path in (ROOT / "gguf_serve").glob("*.py") for match in READ.findall(path.read_text())
            for name in match if name}
    assert {"MODEL", "PARALLEL", "BODY_TIMEOUT_S", "HOST", "PROMPT_CACHE_MIB"} <= read  # the pattern finds each way
    assert read - set(SETTINGS) == set(), "read from the environment but not in config.SETTINGS (the README's table)"


def test_both_layout_tables_name_every_module_and_no_other():
    modules = {path.name for path in (ROOT / "gguf_serve").iterdir() if path.suffix in (".py", ".toml")}
    for doc in ("README.md", "docs/architecture.md"):
        text = (ROOT / doc).read_text()
        layout = text[text.index("## Layout"):]
        listed = set(re.findall(r"^\| `(\w+\.(?:py|toml))` \|", layout, re.M))
        assert listed - modules == set(), f"{doc} lists modules that are gone"
        assert modules - listed - {"__init__.py", "models.toml"} == set(), f"{doc}'s layout misses these modules"
