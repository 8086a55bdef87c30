"""sifpy.config is the one place settings are read, and the README documents exactly its tables.

1. No module but ``sifpy/config.py`` reads a ``SIFPY_*``, ``APPTAINER_*`` or ``SINGULARITY_*``
   variable from the environment (an AST check, as tests/test_proc.py's for subprocess;
   tested on made-up code below).
2. Every variable and ``sifpy.conf`` setting in config.py is in the README's table, and the
   table names nothing else (``make settings`` rewrites it).
3. The C starter reads and sets only the variables config.py says it does.
4. The accessors and the ``sifpy.conf`` parser behave as documented.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sifpy import config
from sifpy.errors import SifpyError

ROOT = Path(__file__).resolve().parent.parent / "sifpy"
README = ROOT.parent / "README.md"
PREFIX = re.compile(r"^(SIFPY|APPTAINER|SINGULARITY)_")
ENV_NAMES = {"environ", "getenv", "putenv", "unsetenv"}
# Statements whose subtree is a whole block of others: each inner statement is checked alone.
BLOCKS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.Try, ast.With)


def _walk(node: ast.AST) -> list[ast.AST]:
    """The subtree, without the calls into sifpy.config (``config.get("SIFPY_X", environ)``
    is the way to read one)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id == "config"
        ):
            continue
        out.append(n)
        todo.extend(ast.iter_child_nodes(n))
    return out


def _reads_env(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id in ENV_NAMES)
        or (isinstance(n, ast.Attribute) and n.attr in ENV_NAMES)
        for n in _walk(node)
    )


def _names_setting(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) and PREFIX.match(n.value)
        for n in _walk(node)
    )


def direct_reads(source: str) -> list[int]:
    """Lines of statements that touch the environment and name a sifpy/Apptainer variable
    (or a prefix of one) in the same statement: ``os.environ.get("SIFPY_X")``,
    ``for n in ("SIFPY_A", "APPTAINER_A"): environ.get(n)``, ``getenv(p + "NOENV")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt) and not isinstance(node, BLOCKS):
            if _reads_env(node) and _names_setting(node):
                found.append(node.lineno)
        elif isinstance(node, ast.If | ast.With):  # the condition or the context expression
            head = (
                node.test
                if isinstance(node, ast.If)
                else ast.Tuple([i.context_expr for i in node.items])
            )
            if _reads_env(head) and _names_setting(head):
                found.append(node.lineno)
    return sorted(set(found))


def test_only_config_reads_settings_from_the_environment() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "config.py":
            continue
        found += [f"{path.relative_to(ROOT.parent)}:{n}" for n in direct_reads(path.read_text())]
    assert found == [], "read these through sifpy.config (declare them there)"


@pytest.mark.parametrize(
    "code",
    [
        'import os\nx = os.environ.get("SIFPY_X")\n',
        'import os\ndef f():\n    return os.getenv("APPTAINER_Y", "")\n',
        'def f(environ):\n    for n in ("SIFPY_A", "SINGULARITY_A"):\n        v = environ.get(n)\n',
        'import os\nif os.environ.get("SIFPY_Z") == "1":\n    pass\n',
        'import os\nos.environ["SIFPY_W"] = "1"\n',
        'import os\nv = any(os.environ.get(p + "NOENV") for p in ("APPTAINER_", "SIFPY_"))\n',
    ],
)
def test_the_check_sees_a_direct_read(code: str) -> None:
    assert direct_reads(code) != []


def test_the_check_leaves_other_variables_and_messages_alone() -> None:
    code = (
        'from sifpy import config\nv = config.get_all("SIFPY_BIND", environ)\n'
        'import os\nhome = os.environ.get("HOME")\n'
        'hint = "set SIFPY_CACHEDIR to a directory of yours"\n'
        'env = {}\nenv["__SIFPY_UID"] = "1"\n'
    )
    assert direct_reads(code) == []


def _readme_section() -> str:
    text = README.read_text()
    begin, end = text.find(config.README_BEGIN), text.find(config.README_END)
    assert 0 <= begin < end, "the README lost its settings markers"
    return text[begin : end + len(config.README_END)] + "\n"


def test_readme_names_every_setting_and_no_other() -> None:
    section = _readme_section()
    listed = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section, re.M))
    assert listed == set(config.VARS)
    aliases = {a for v in config.VARS.values() for a in v.also}
    assert set(re.findall(r"`((?:APPTAINER|SINGULARITY)_[A-Z0-9_]+)`", section)) >= aliases
    keys = set(re.findall(r"^\| `([a-z][a-z ]*)`", section, re.M))
    assert keys == set(config.CONF)


def test_readme_table_is_the_one_config_prints() -> None:
    assert _readme_section() == config.markdown(), "run `make settings` to rewrite the table"


def test_the_starter_reads_only_what_config_says_it_does() -> None:
    c_files = sorted((ROOT / "cli").glob("starter*.c"))
    c_files += sorted((ROOT / "runtime" / "serve").glob("*.[ch]"))
    in_c = set()
    for path in c_files:
        in_c |= set(re.findall(r'"((?:SIFPY|APPTAINER|SINGULARITY)_[A-Z0-9_]+)"', path.read_text()))
    declared = {n for v in config.VARS.values() if v.starter for n in config.names(v.name)}
    assert in_c == declared
    # The settings that send a start to Python reach the starter as one generated list.
    from sifpy.cli.launcher import fast_start_config

    listed = set(re.findall(r'"([A-Z0-9_]+)"', fast_start_config()["SIFPY_FAST_ENV_NAMES"]))
    assert listed == {n for v in config.VARS.values() if v.start for n in config.names(v.name)}
    assert {"SIFPY_BIND", "APPTAINER_BIND", "SIFPY_NOENV", "SIFPY_PYTHON_START"} <= listed


def test_names_get_and_get_all() -> None:
    env = {"APPTAINER_BIND": "/a", "SIFPY_BIND": "/b", "APPTAINER_CACHEDIR": "/c"}
    assert config.names("SIFPY_BIND") == ("SIFPY_BIND", "APPTAINER_BIND")
    # sifpy's name first for one value, last in a list (where later entries win).
    assert config.get("SIFPY_BIND", env) == "/b"
    assert config.get_all("SIFPY_BIND", env) == ["/a", "/b"]
    assert config.get("SIFPY_CACHEDIR", env) == "/c"
    assert config.get("SIFPY_CACHEDIR", {"SIFPY_CACHEDIR": "", "APPTAINER_CACHEDIR": "/c"}) == "/c"
    assert config.get("SIFPY_MOUNT", env) is None
    assert config.raw("APPTAINER_BIND", env) == "/a"
    with pytest.raises(KeyError):
        config.get("SIFPY_NOT_DECLARED", env)


def test_flag_and_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIFPY_NOHTTPS", raising=False)
    monkeypatch.setenv("APPTAINER_NOHTTPS", "True")
    assert config.flag("SIFPY_NOHTTPS")
    monkeypatch.setenv("APPTAINER_NOHTTPS", "0")
    assert not config.flag("SIFPY_NOHTTPS")
    monkeypatch.setenv("SIFPY_SERVED", "1,2")
    assert config.take("SIFPY_SERVED") == "1,2"
    assert config.raw("SIFPY_SERVED") is None


def test_read_conf(tmp_path: Path) -> None:
    conf = tmp_path / "sifpy.conf"
    conf.write_text(
        "# a comment\nverify = optional\nVerify  = required   # last wins\n"
        "bind path = /a\nbind path = /b:/c\nnvliblist = /x\n"
    )
    assert config.read_conf(str(conf), missing_ok=False) == {
        "verify": ["required"],
        "bind path": ["/a", "/b:/c"],
        "nvliblist": ["/x"],
    }
    assert config.read_conf(str(tmp_path / "none"), missing_ok=True) is None
    with pytest.raises(SifpyError, match="No such file"):
        config.read_conf(str(tmp_path / "none"), missing_ok=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("hooks = /x", "2: unknown setting 'hooks'"),
        ("verify = maybe", "2: verify must be 'required' or 'optional'"),
        ("bind path", "2: expected 'key = value'"),
    ],
)
def test_read_conf_refuses_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    conf = tmp_path / "sifpy.conf"
    conf.write_text(f"verify = optional\n{line}\n")
    with pytest.raises(SifpyError) as exc:
        config.read_conf(str(conf), missing_ok=True)
    assert exc.value.message == f"can't read config: {conf}:{message}"
    assert exc.value.hint is not None and "bind path" in exc.value.hint


def test_config_is_cheap_to_import() -> None:
    """On the exec path: nothing but os and the error tree."""
    import subprocess
    import sys

    code = (
        f"import sys, os, __future__; sys.path.insert(0, {str(ROOT.parent)!r}); "
        "before = set(sys.modules); "
        "import sifpy.config; print(sorted(set(sys.modules) - before))"
    )
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['sifpy', 'sifpy.config', 'sifpy.errors']"
