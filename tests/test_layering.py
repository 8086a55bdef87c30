"""The layering rule of docs/architecture.md, checked on the source tree.

1. Imports point down: a module imports sifpy modules of a lower layer, or of its own package.
   Packages on the same layer do not import each other.
2. No module imports another package's private names (``sifpy.x._y`` or ``from sifpy.x.y
   import _z``): what a package offers the others is its public surface.
3. Only ``sifpy/runtime/`` calls unshare, setns, mount, umount or pivot_root.

The checker is a function over a directory so that the test of the test can feed it a small
made-up tree that breaks each rule.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sifpy"

# Layer of each top-level part of the package (a subpackage or a top-level module).
LAYERS: dict[str, int] = {
    "__init__": 0,  # the package docstring and __version__
    "errors": 0,
    "util": 1,
    "config": 1,
    "sif": 2,
    "deffile": 2,
    "runtime": 2,
    "sign": 3,
    "squashfs": 3,
    "oci": 3,
    "rootfs": 4,
    "build": 5,
    "pull": 5,
    "push": 5,
    "export": 5,
    "cli": 6,
    "__main__": 7,
}

# The parts that are modules, not packages.
MODULES = {"__init__", "__main__", "errors", "config", "pull", "push", "export"}

# Kernel calls that set up containers: runtime/ owns them.
KERNEL_CALLS = {
    "unshare",
    "setns",
    "pivot_root",
    "mount",
    "umount",
    "umount2",
    "fsmount",
    "move_mount",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _part(module: str) -> str:
    """The top-level part of a dotted module name under sifpy (``sifpy.oci.cache`` -> ``oci``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_pkg: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every sifpy import, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sifpy" or alias.name.startswith("sifpy."):
                    found.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([name] if name else []))
            if name == "sifpy" or name.startswith("sifpy."):
                names = [a.name for a in node.names]
                if name == "sifpy":  # `from sifpy import policy` imports a module
                    for sub in names:
                        found.append((node.lineno, f"sifpy.{sub}", []))
                else:
                    found.append((node.lineno, name, names))
    return found


def violations(root: Path) -> list[str]:
    """Every breach of the layering rules in the package at *root*, as ``path:line: why``."""
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        mine = _part(module)
        where = path.relative_to(root.parent)
        tree = ast.parse(path.read_text(), str(path))
        for line, target, names in _imports(tree, module, path.name == "__init__.py"):
            theirs = _part(target)
            if not (root / theirs).is_dir() and not (root / f"{theirs}.py").is_file():
                theirs = "__init__"  # `from sifpy import __version__`: a name of the package
                target = "sifpy"
            if mine != theirs:
                if theirs not in LAYERS or mine not in LAYERS:
                    out.append(f"{where}:{line}: {target}: part not in the layer table")
                elif LAYERS[theirs] >= LAYERS[mine]:
                    out.append(
                        f"{where}:{line}: {mine} (layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})"
                    )
                private = [p for p in target.split(".")[1:] + names if _private(p)]
                if private:
                    out.append(f"{where}:{line}: imports private {', '.join(private)} of {target}")
        if mine != "runtime":
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    fn = node.func
                    name = (
                        fn.attr
                        if isinstance(fn, ast.Attribute)
                        else fn.id
                        if isinstance(fn, ast.Name)
                        else ""
                    )
                    if name in KERNEL_CALLS:
                        out.append(f"{where}:{node.lineno}: calls {name}() outside runtime/")
    return out


def test_sifpy_keeps_its_layers() -> None:
    assert violations(ROOT) == []


def test_every_part_has_a_layer() -> None:
    parts = {
        p.stem if p.is_file() else p.name
        for p in ROOT.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert parts <= set(LAYERS), parts - set(LAYERS)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "sifpy"
    skeleton = {f"{p}.py" if p in MODULES else f"{p}/__init__.py": "" for p in LAYERS}
    for name, text in {**skeleton, **files}.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        for parent in p.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
        p.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a stage importing a pipeline
        (
            {"rootfs/agent.py": "from sifpy.pull import download\n"},
            "rootfs (layer 4) imports sifpy.pull (layer 5)",
        ),
        # peers on one layer
        (
            {"oci/x.py": "import sifpy.sign.verify\n"},
            "oci (layer 3) imports sifpy.sign.verify (layer 3)",
        ),
        # lazily, inside a function, and as `from sifpy import`
        (
            {"util/x.py": "def f():\n    from sifpy import build\n"},
            "util (layer 1) imports sifpy.build (layer 5)",
        ),
        # relative imports resolve
        ({"sif/x.py": "from ..cli import exec\n"}, "sif (layer 2) imports sifpy.cli (layer 6)"),
        # a private module and a private name of another package
        ({"cli/x.py": "from sifpy.rootfs._compress import grow\n"}, "imports private _compress"),
        (
            {"build/pipeline.py": "from sifpy.rootfs.unpack import _entry\n"},
            "imports private _entry",
        ),
        # the kernel outside runtime/
        ({"squashfs/x.py": "import os\nos.unshare(0)\n"}, "calls unshare() outside runtime/"),
        (
            {"rootfs/x.py": "libc.mount(b'a', b'b', None, 0, None)\n"},
            "calls mount() outside runtime/",
        ),
    ],
)
def test_the_checker_finds_each_breach(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    found = violations(_tree(tmp_path, files))
    assert any(expected in v for v in found), found


def test_the_checker_allows_downward_and_own_package_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "cli/x.py": "from sifpy.build.pipeline import build\nfrom sifpy.cli import _args\n",
            "rootfs/stream.py": "from sifpy.rootfs.unpack import _entry\nfrom sifpy.oci import registry\n",
            "runtime/ns.py": "import os\nos.unshare(0)\n",
            "sign/v.py": "from sifpy.sif import format\nfrom sifpy.errors import X\n",
        },
    )
    assert violations(root) == []


# The repository stands alone: comments cite upstream sources, not notes outside the tree or
# tracker numbers a reader can't open.
OUTSIDE = re.compile(
    r"\.\./shared|shared/reference|(?<!docs/)\b(apptainer|security|hpc|peers)\.md\b"
    r"|\bissue \d+|\(issue|closing notes"
)


def test_no_reference_leads_outside_the_repository() -> None:
    repo = ROOT.parent
    files = [repo / "README.md", repo / "Makefile"] + [
        path
        for top in ("sifpy", "tests", "integration", "bench", "docs", "recipes")
        for path in sorted((repo / top).rglob("*"))
        if path.suffix in (".py", ".c", ".md", ".sh", ".def") and path != Path(__file__)
    ]
    hits = [
        f"{path.relative_to(repo)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert hits == []


# Modules that do one thing: none of sifpy/ over ~500 lines. The ones listed still wait for
# their split (by verb, as sylabs/sif has one file per verb); a split removes its line.
LINES_MAX = 500


def test_no_module_does_too_many_things() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted(ROOT.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > LINES_MAX
    }
    assert long == {}
