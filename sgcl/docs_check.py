"""Check the documented ``sgcl`` command lines (README, docs/*.md, every ``--help``) without running them.

    python -m sgcl.docs_check                    # README.md, docs/*.md and every command's --help
    python -m sgcl.docs_check docs/tiling.md     # one file

A command line is found in a fenced shell block or an inline code span of a Markdown file, or in a
``--help`` text (its examples, its backtick spans and the ``e.g. key=value`` of its overrides). It
may be ``sgcl ...``, ``.venv/bin/sgcl ...``, ``python -m sgcl ...`` or ``torchrun ... -m sgcl.cli ...``,
one step of an ``a && b`` chain, continued with ``\\``, followed by a ``# comment``. Each one is checked
in-process through the command's own ``--print-config`` path, so nothing is run: the sub-command
exists, argparse accepts every flag, every ``key=value`` override is a real key with a valid value
and a ``--config`` file under the repo exists. A ``--config`` outside the repo (a file the user brings)
is left out, the rest is still checked. Commands without a config (``sgcl eval seg predict`` and
``build-nuclei``) are parsed only. Placeholders: ``...`` / ``…`` (more arguments, or an option's
value), ``SLIDES…``, ``knn|linear`` and ``{a,b}`` (each alternative is checked).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]

# sub-command words -> (module, parser factory, its arguments); the longest match wins
PARSERS: dict[tuple[str, ...], tuple[str, str, tuple[str, ...]]] = {
    ("tile",): ("preprocessing.tile", "build_parser", ()),
    ("pretrain",): ("sgcl.pretrain", "build_parser", ()),
    ("extract",): ("evaluation.extract", "build_parser", ()),
    ("eval", "knn"): ("evaluation.cli", "build_parser", ("knn",)),
    ("eval", "linear"): ("evaluation.cli", "build_parser", ("linear",)),
    ("eval", "fewshot"): ("evaluation.cli", "build_parser", ("fewshot",)),
    ("eval", "seg"): ("evaluation.segmentation.cli", "build_parser", ("train",)),
    ("eval", "seg", "train"): ("evaluation.segmentation.cli", "build_parser", ("train",)),
    ("eval", "seg", "predict"): ("evaluation.segmentation.cli", "build_parser", ("predict",)),
    ("eval", "seg", "build-nuclei"): ("evaluation.segmentation.cli", "build_parser", ("build-nuclei",)),
    ("eval", "mil"): ("evaluation.mil.cli", "build_parser", ()),
    ("heatmap",): ("evaluation.heatmap_cli", "build_parser", ()),
    ("demo",): ("sgcl.demo", "build_parser", ()),
}
PARSE_ONLY = {("eval", "seg", "predict"), ("eval", "seg", "build-nuclei")}  # no config to resolve
GROUPS = {("eval",)}  # named alone in prose (`sgcl eval`): the group exists, nothing else to check

SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
_ELLIPSES = ("...", "…")
_SEPARATORS = {"&&", "||", ";", "|"}
_PYTHON = re.compile(r"^(python[\d.]*|torchrun)$")
_OVERRIDE_EXAMPLE = re.compile(r"(?:e\.g\.|such as)\s+([A-Za-z_][\w.]*=[^\s,;)]+)")
_INVOCATION = re.compile(r"(?:^|[\s/])sgcl\s+[a-z]")
_MODULE = re.compile(r"(?:^|\s)-m\s+sgcl(?:\.cli)?(?:\s|$)")
_BRACES = re.compile(r"\{([^{}$]*,[^{}]*)\}")


@dataclass(frozen=True)
class Example:
    """One documented command line and where it is written."""

    source: str  # a file relative to the repo, or e.g. "sgcl tile --help"
    line: int  # 1-based line of its first line
    text: str  # as written (continuation lines joined)
    fragment: bool = False  # an inline code span in prose (may name an option without its value)

    def where(self) -> str:
        return f"{self.source}:{self.line}"


# -- finding the command lines -----------------------------------------------------------------
def _joined_lines(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Shell lines with their ``\\`` continuation lines joined: (number of the first line, text)."""
    start, parts = 0, []
    for number, line in lines:
        text = line.strip()
        if text.startswith("$ "):
            text = text[2:]
        if not parts:
            start = number
        if text.endswith("\\") and not text.lstrip().startswith("#"):
            parts.append(text[:-1].rstrip())
            continue
        parts.append(text)
        yield start, " ".join(p for p in parts if p)
        parts = []
    if parts:
        yield start, " ".join(parts)


def _starts_command(text: str) -> bool:
    """Does the line start with an sgcl command (``sgcl x``, ``.venv/bin/sgcl x``, ``python -m sgcl x``)?"""
    words = text.split()
    if len(words) < 2 or re.match(r"\d", words[1]):
        return False  # `sgcl` alone (the method's name) or the version banner of `sgcl --help`
    return Path(words[0]).name == "sgcl" or bool(_PYTHON.match(Path(words[0]).name) and _MODULE.search(text))


def _invokes_sgcl(text: str) -> bool:
    """Does a shell line run sgcl anywhere (``a && .venv/bin/sgcl demo``)?"""
    return bool(_INVOCATION.search(text) or _MODULE.search(text))


def examples_in_markdown(path: Path, root: Path = REPO) -> list[Example]:
    """The ``sgcl`` command lines of a Markdown file: fenced shell blocks and inline code spans."""
    source = str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)
    found: list[Example] = []
    block: list[tuple[int, str]] | None = None
    shell = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if block is None:
                block, shell = [], stripped[3:].strip().lower() in SHELL_FENCES
            else:
                if shell:
                    found += [Example(source, n, text) for n, text in _joined_lines(block) if _invokes_sgcl(text)]
                block = None
            continue
        if block is not None:
            block.append((number, line))
            continue
        for span in re.findall(r"`([^`]+)`", line):
            span = span.replace("\\|", "|").strip()
            if _starts_command(span):
                found.append(Example(source, number, span, fragment=True))
    return found


@functools.lru_cache(maxsize=None)
def _parser(key: tuple[str, ...]) -> argparse.ArgumentParser:
    module, factory, args = PARSERS[key]
    return getattr(importlib.import_module(module), factory)(*args)


def examples_in_help() -> list[Example]:
    """The command lines of ``sgcl --help``, ``sgcl eval --help`` and every sub-command's ``--help``:
    its example lines, its backtick spans and the ``e.g. key=value`` override example."""
    from evaluation.cli import _usage as eval_usage
    from sgcl.cli import _usage

    texts = {"sgcl --help": ((), _usage()), "sgcl eval --help": (("eval",), eval_usage())}
    for key in PARSERS:
        if key != ("eval", "seg", "train"):  # the same parser as `sgcl eval seg`
            texts[f"sgcl {' '.join(key)} --help"] = (key, _parser(key).format_help())
    found: list[Example] = []
    for source, (key, text) in texts.items():
        lines = list(enumerate(text.splitlines(), 1))
        found += [Example(source, n, t) for n, t in _joined_lines(lines) if not t.startswith("#") and _starts_command(t)]
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            if _starts_command(span):
                found.append(Example(source, text.count("\n", 0, m.start()) + 1, span, fragment=True))
        for m in _OVERRIDE_EXAMPLE.finditer(text):
            found.append(Example(source, text.count("\n", 0, m.start()) + 1, f"sgcl {' '.join(key)} {m.group(1)}"))
    return found


def default_examples(root: Path = REPO) -> list[Example]:
    """README.md, docs/*.md and every ``--help``."""
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [e for f in files for e in examples_in_markdown(f, root)] + examples_in_help()


# -- turning a command line into sgcl argv lists ---------------------------------------------
def _expand(token: str) -> list[str]:
    """``{a,b}`` brace alternatives and ``a|b`` (knn|linear) alternatives of one token."""
    m = _BRACES.search(token)
    if m:
        return [x for alt in m.group(1).split(",") for x in _expand(token[:m.start()] + alt + token[m.end():])]
    return token.split("|") if "|" in token else [token]


def sgcl_argvs(text: str) -> list[list[str]]:
    """The argument lists (after ``sgcl``) of the sgcl commands in one shell line (``[]``: none).

    Raises ValueError for a line the shell could not split (an unbalanced quote)."""
    tokens = shlex.split(text, comments=True)
    segments = [list(g) for sep, g in itertools.groupby(tokens, lambda t: t in _SEPARATORS) if not sep]
    argvs = []
    for seg in segments:
        if Path(seg[0]).name == "sgcl":
            rest = seg[1:]
        elif _PYTHON.match(Path(seg[0]).name) and any(
                a == "-m" and b in ("sgcl", "sgcl.cli") for a, b in zip(seg, seg[1:])):
            i = next(i for i, (a, b) in enumerate(zip(seg, seg[1:])) if a == "-m" and b in ("sgcl", "sgcl.cli"))
            rest = seg[i + 2:]
        else:
            continue
        argvs += [list(p) for p in itertools.product(*[_expand(t) for t in rest])]
    return argvs


# -- checking one argv -------------------------------------------------------------------------
def _takes_value(parser: argparse.ArgumentParser, token: str) -> bool:
    action = parser._option_string_actions.get(token.split("=", 1)[0])  # noqa: SLF001 (argparse has no public lookup)
    return action is not None and action.nargs != 0 and "=" not in token


def _placeholders(rest: list[str], parser: argparse.ArgumentParser, fragment: bool) -> list[str]:
    """``...`` after an option that takes a value -> a value; elsewhere -> dropped; ``SLIDES…`` -> ``SLIDES``.
    In prose (``fragment``), a last option named without its value gets one."""
    out: list[str] = []
    for token in rest:
        if token in _ELLIPSES:
            if out and _takes_value(parser, out[-1]):
                out.append("PLACEHOLDER")
            continue
        out.append(token[:-1] if token.endswith("…") else token[:-3] if token.endswith("...") else token)
    if fragment and out and _takes_value(parser, out[-1]):
        out.append("VALUE")
    return out


def _repo_config(rest: list[str], root: Path) -> list[str]:
    """``--config configs/x.yaml`` -> the repo's file (an error when it is not there); a ``--config``
    the user brings (outside the repo) is left out. Raises ValueError naming a missing repo file."""
    out: list[str] = []
    tokens = iter(rest)
    for token in tokens:
        flag, eq, value = token.partition("=")
        if flag in ("--config", "-c"):
            value = value if eq else next(tokens, "")
            path = Path(value)
            if not path.is_absolute() and path.parts and (root / path.parts[0]).exists():
                if not (root / path).is_file():
                    raise ValueError(f"--config {value}: no such file in the repo")
                out += ["--config", str(root / path)]
            continue  # the user's own file: checked against the defaults
        out.append(token)
    return out


def _run(argv: list[str]) -> tuple[int, str]:
    """``sgcl.cli.main(argv)`` in-process: (exit code, stdout + stderr)."""
    from sgcl.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(code or 0), buf.getvalue()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def check_argv(argv: list[str], *, fragment: bool = False, root: Path = REPO) -> str | None:
    """Check one sgcl argument list without running it: ``None`` when it is fine, else the error."""
    from sgcl.cli import COMMANDS

    if not argv or argv[0] in ("-h", "--help", "-V", "--version"):
        return None
    if argv[0] not in COMMANDS:
        if fragment and argv[0].startswith("<"):
            return None  # `sgcl <command> --help`: a pattern, not a command
        return f"unknown command {argv[0]!r}; sgcl has: {', '.join(COMMANDS)}"
    key = max((k for k in PARSERS if tuple(argv[:len(k)]) == k), key=len, default=None)
    if key is None:
        if fragment and (tuple(argv) in GROUPS or argv[1:2] == ["<protocol>"]):
            return None
        subs = sorted({k[1] for k in PARSERS if k[0] == argv[0] and len(k) > 1})
        return f"unknown sub-command {' '.join(argv[:2])!r}; sgcl {argv[0]} has: {', '.join(subs)}"
    parser = _parser(key)
    rest = _placeholders(argv[len(key):], parser, fragment)
    try:
        rest = _repo_config(rest, root)
    except ValueError as exc:
        return str(exc)
    if key in PARSE_ONLY or any(t in ("-h", "--help") for t in rest):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                parser.parse_args(rest)
            except SystemExit as exc:
                if exc.code:
                    return f"exit {exc.code}: {_last_line(buf.getvalue())}"
        return None
    code, out = _run([*key, *rest, "--print-config"])
    return None if code == 0 else f"exit {code}: {_last_line(out)}"


def check_example(example: Example, root: Path = REPO) -> list[str]:
    """The errors of one documented command line (one per broken alternative; ``[]``: fine)."""
    try:
        argvs = sgcl_argvs(example.text)
    except ValueError as exc:
        return [f"{example.where()}: {example.text}\n    cannot split the line: {exc}"]
    errors = []
    for argv in argvs:
        error = check_argv(argv, fragment=example.fragment, root=root)
        if error:
            errors.append(f"{example.where()}: {example.text}\n    sgcl {shlex.join(argv)}: {error}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgcl.docs_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md, docs/*.md and every --help)")
    args = parser.parse_args(argv)
    missing = [f for f in args.files if not f.is_file()]
    if missing:
        print(f"docs_check: {missing[0]} does not exist; pass Markdown files", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    examples = [e for f in args.files for e in examples_in_markdown(f)] if args.files else default_examples()
    errors = [err for e in examples for err in check_example(e)]
    for err in errors:
        print(err)
    print(f"{len(examples)} documented command lines checked, {len(errors)} broken", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
