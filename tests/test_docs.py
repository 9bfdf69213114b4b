"""The code in README.md and docs/*.md still holds.

- Python blocks compile; every module they import exists and has the names they import; every
  ``module.attr.attr`` they use on an imported module (or on ``fastcon`` and ``torch``, which
  snippets may use without importing them) exists; calls of such functions and
  classes bind to the real signature (keyword names, positional count).
- Shell blocks: every ``python examples/X.py``, ``python -m module [subcommand]`` and
  ``torchrun ... examples/X.py`` shows only flags its argparse parser defines, and the
  ``section.key=value`` overrides given to the pretraining scripts are keys of
  ``examples/configs/defaults.yaml``; ``make TARGET`` names a Makefile target, and the
  options in ``DEMO_ARGS`` are the demo's.
- Relative links point to files that exist, and ``#anchors`` to headings of the target page.

A page added under docs/ is checked as soon as it exists.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import inspect
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
# scripts whose positional section.key=value overrides go through examples/configs/defaults.yaml
CONFIG_SCRIPTS = {"examples/pretrain.py", "examples/demo.py"}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


LANGS = {"python": ("python", "py"), "bash": ("bash", "sh", "shell")}


def blocks(lang: str) -> list[tuple[str, int, str]]:
    """(page, line, code) of every fenced block of ``lang`` (or an alias of it) on every page."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) in LANGS[lang]:
                out.append((_rel(page), text.count("\n", 0, m.start()) + 1, m.group(2)))
    return out


def _ids(items):
    return [f"{page}:{line}" for page, line, _ in items]


def test_every_page_has_code_blocks_to_check():
    """Guards the fence pattern itself: a pattern that matched nothing would pass everything."""
    assert len(PAGES) >= 2
    assert len(blocks("python")) >= 5
    assert len(blocks("bash")) >= 5


# ---------------------------------------------------------------------------------------------
# Python blocks


def _resolve(module_name: str, attrs: list[str], where: str):
    obj = importlib.import_module(module_name)
    path = module_name
    for a in attrs:
        if not hasattr(obj, a):
            # a submodule not imported by its package yet
            with contextlib.suppress(ImportError):
                importlib.import_module(f"{path}.{a}")
        assert hasattr(obj, a), f"{where}: {path}.{a} does not exist"
        obj, path = getattr(obj, a), f"{path}.{a}"
    return obj


def _chain(node: ast.AST) -> list[str] | None:
    """["fastcon", "distributed", "WORLD"] for fastcon.distributed.WORLD; None if not a plain chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _check_call(obj, call: ast.Call, where: str, name: str) -> None:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and C functions without a signature
        return
    try:
        sig.bind(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
    except TypeError as e:
        # a missing required argument only means the snippet leaves it to the reader
        if "missing" not in str(e):
            raise AssertionError(f"{where}: {name}(...) does not fit {name}{sig}: {e}") from None


@pytest.mark.parametrize(("page", "line", "code"), blocks("python"), ids=_ids(blocks("python")))
def test_python_block_compiles_and_its_names_exist(page, line, code):
    where = f"{page}:{line}"
    try:
        tree = ast.parse(code, filename=where)
    except SyntaxError as e:
        pytest.fail(f"{where}: the python block does not compile: {e}")
    # local name -> (module, attribute path); snippets may use fastcon and torch without importing them
    modules = {"fastcon": ("fastcon", []), "torch": ("torch", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
                if alias.asname:
                    modules[alias.asname] = (alias.name, [])
                else:
                    top = alias.name.split(".")[0]
                    modules[top] = (top, [])
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{where}: relative import"
            for alias in node.names:
                obj = _resolve(node.module, [alias.name], where)
                if inspect.ismodule(obj):
                    modules[alias.asname or alias.name] = (obj.__name__, [])
                else:
                    modules[alias.asname or alias.name] = (node.module, [alias.name])
    for node in ast.walk(tree):
        target = node.func if isinstance(node, ast.Call) else node
        if not isinstance(target, (ast.Attribute, ast.Name)):
            continue
        chain = _chain(target)
        if not chain or chain[0] not in modules:
            continue
        module_name, prefix = modules[chain[0]]
        obj = _resolve(module_name, [*prefix, *chain[1:]], where)
        if isinstance(node, ast.Call):
            _check_call(obj, node, where, ".".join(chain))


# ---------------------------------------------------------------------------------------------
# shell blocks


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@functools.cache
def _parser_of(target: str) -> argparse.ArgumentParser:
    """The argparse parser of ``examples/X.py`` or of ``python -m pkg.mod``, caught the moment the
    script, run as ``__main__``, parses its command line: nothing runs beyond that."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_known_args = capture
    saved_path = list(sys.path)
    try:
        if target.endswith(".py"):
            path = ROOT / target
            assert path.is_file(), f"{target} does not exist"
            sys.path.insert(0, str(path.parent))  # as python does for a script
            runpy.run_path(str(path), run_name="__main__")
        else:
            spec = importlib.util.find_spec(target)
            assert spec is not None, f"module {target} does not exist"
            # runpy warns when the module it runs (a package's __main__) was imported already: run a
            # fresh copy, leave the imported one in place
            ran = target + ".__main__" if spec.submodule_search_locations is not None else target
            held = sys.modules.pop(ran, None)
            try:
                runpy.run_module(target, run_name="__main__", alter_sys=False)
            finally:
                if held is not None:
                    sys.modules[ran] = held
    except _Parsed as p:
        return p.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.path[:] = saved_path
    raise AssertionError(f"{target} ran to its end without parsing a command line")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert name in action.choices, f"no subcommand {name!r} (there are {', '.join(action.choices)})"
            return action.choices[name]
    return None


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


@functools.cache
def _config_schema() -> dict:
    return yaml.safe_load((ROOT / "examples" / "configs" / "defaults.yaml").read_text())


def _check_override(token: str, where: str) -> None:
    node = _config_schema()
    key = token.split("=", 1)[0]
    for part in key.split("."):
        message = f"{where}: {key} is not a key of examples/configs/defaults.yaml"
        assert isinstance(node, dict), message
        assert part in node, message
        node = node[part]


def _check_args(target: str, args: list[str], where: str) -> None:
    parser = _parser_of(target)
    if args and not args[0].startswith("-"):
        sub = _subparser(parser, args[0])
        if sub is not None:
            parser, args = sub, args[1:]
    flags = _flags(parser)
    for token in args:
        if token.startswith("--") and len(token) > 2:
            flag = token.split("=", 1)[0]
            assert flag in flags, f"{where}: {target} has no option {flag} (it has {', '.join(sorted(flags))})"
        elif target in CONFIG_SCRIPTS and re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=.*", token):
            _check_override(token, where)


@functools.cache
def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


@functools.cache
def _torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser

    return _flags(get_args_parser())


def commands(code: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in code.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def check_command(line: str, where: str) -> bool:
    """Checks one command; returns whether it was one of the kinds this test knows."""
    tokens = shlex.split(line)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):  # leading VAR=value
        tokens = tokens[1:]
    if not tokens:
        return False
    prog, args = tokens[0], tokens[1:]
    if prog == "make":
        for token in args:
            if "=" in token:
                var, value = token.split("=", 1)
                if var == "DEMO_ARGS":
                    _check_args("examples/demo.py", shlex.split(value), where)
            else:
                assert token in _make_targets(), f"{where}: the Makefile has no target {token!r}"
        return True
    if prog == "torchrun":
        script = next((i for i, t in enumerate(args) if t.endswith(".py")), None)
        assert script is not None, f"{where}: torchrun without a script"
        for token in args[:script]:
            if token.startswith("--"):
                assert token.split("=", 1)[0] in _torchrun_flags(), f"{where}: torchrun has no option {token}"
        _check_args(args[script], args[script + 1 :], where)
        return True
    if prog == "python" or prog.endswith("/python"):
        if args[:1] == ["-m"] and len(args) > 1:
            if args[1] in ("pip", "pytest"):
                return False
            _check_args(args[1], args[2:], where)
            return True
        if args and args[0].startswith("examples/"):
            _check_args(args[0], args[1:], where)
            return True
    return False


@pytest.mark.parametrize(("page", "line", "code"), blocks("bash"), ids=_ids(blocks("bash")))
def test_shell_block_flags_exist(page, line, code):
    for command in commands(code):
        check_command(command, f"{page}:{line}")


def test_shell_checks_catch_what_they_should():
    """The shell checks fail on a wrong flag, override, subcommand or target (else they check nothing)."""
    good = [
        "python examples/pretrain.py --config examples/configs/demo.yaml --resume optim.lr=3e-4",
        "python -m fastcon.data prepare DIR --out OUT --stride 64",
        "torchrun --nproc-per-node=2 examples/distributed_loss.py --mode ring",
        'make demo DEMO_ARGS="--fresh train.steps=100"',
    ]
    for line in good:
        assert check_command(line, "good")
    bad = [
        "python examples/pretrain.py --config x.yaml --resumee",
        "python examples/pretrain.py --config x.yaml optim.lrate=3e-4",
        "python -m fastcon.data prepare DIR --outt OUT",
        "python -m fastcon.data prpare DIR",
        "torchrun --nproc-per-nod=2 examples/distributed_loss.py",
        'make demo DEMO_ARGS="--fres"',
        "make dmeo",
    ]
    for line in bad:
        with pytest.raises(AssertionError):
            check_command(line, "bad")
    assert not check_command("source .venv/bin/activate", "other")


def test_python_checks_catch_what_they_should():
    for code in (
        "import fastcon\nfastcon.soft_contrastive_loss(z1, z2, temprature=0.1)\n",
        "from fastcon.models import create_encoderr\n",
        "import fastcon\nfastcon.no_such_op(x)\n",
        "fastcon.SoftContrastiveLoss(0.1, learnable_temprature=True)\n",  # fastcon without an import
        "fastcon.soft_contrastive_loss(z1, z2, labels, *, temperature=0.1)\n",
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            test_python_block_compiles_and_its_names_exist("bad", 1, code)


# ---------------------------------------------------------------------------------------------
# links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_links_point_to_files_and_headings_that_exist(page):
    text = FENCE.sub("", page.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_rel(page)}: link to {target}: {path} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), (
                f"{_rel(page)}: link to {target}: {dest.name} has no heading with anchor #{anchor}"
            )


def test_slugs_follow_github():
    assert _slug("Expected H100 performance (roofline, not measured: no GPU was available)") == (
        "expected-h100-performance-roofline-not-measured-no-gpu-was-available"
    )
    assert _slug("Using `.venv`") == "using-venv"
    assert _slug("`fastcon.soft_contrastive_loss`") == "fastconsoft_contrastive_loss"
