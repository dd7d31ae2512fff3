"""Every documented ``sgcl`` command line works (issue 13): README.md, docs/*.md and every ``--help``.

Each command line is checked in-process by :mod:`sgcl.docs_check` through the command's own
``--print-config`` path, so nothing heavy runs: the sub-command exists, argparse accepts every flag,
every ``key=value`` is a real key with a valid value, and a ``--config`` under the repo exists. A
broken example fails with its file, line and command.

Checked only in part (nothing is excluded outright):
- ``torchrun ... -m sgcl.cli <command> ...`` lines: the sgcl part is checked, not torchrun's own flags.
- ``...`` / ``…`` placeholders (``--init-weights /models/phikon ...``, ``--encoder …``): the rest of
  the line is checked; a placeholder that is an option's value stands for a value.
- A ``--config`` outside the repo (a file the user brings): the rest is checked against the defaults
  (no documented command has one at present).
- ``sgcl eval seg predict`` / ``build-nuclei`` take no config: their flags are parsed only.
- README command 2 (pip install + pytest) runs no sgcl command: :func:`test_readme_commands_cheap_parts`
  checks its ``.[dev]`` extra and ``tests`` folder instead.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from sgcl import docs_check
from sgcl.docs_check import Example, check_argv, check_example, examples_in_help, examples_in_markdown, sgcl_argvs
from _bad_input import BadInput, run_case

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HELP_SOURCES = ["sgcl --help", "sgcl eval --help"] + [
    f"sgcl {' '.join(k)} --help" for k in docs_check.PARSERS if k != ("eval", "seg", "train")
]
# (source, line) -> why that documented command line is not checked; none at present
EXCLUDED: dict[tuple[str, int], str] = {}


@pytest.fixture(scope="module")
def help_examples() -> list[Example]:
    return examples_in_help()


def _errors(examples: list[Example]) -> list[str]:
    return [err for e in examples if (e.source, e.line) not in EXCLUDED for err in check_example(e)]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_examples_work(path: Path):
    errors = _errors(examples_in_markdown(path, REPO))
    assert not errors, "broken documented command lines (file:line: command, then why):\n" + "\n".join(errors)


@pytest.mark.parametrize("source", HELP_SOURCES)
def test_help_examples_work(source: str, help_examples: list[Example]):
    examples = [e for e in help_examples if e.source == source]
    assert examples, f"{source} shows no example command line"
    errors = _errors(examples)
    assert not errors, "broken --help examples (help:line: command, then why):\n" + "\n".join(errors)


def test_every_command_help_has_examples_and_a_real_override_example(help_examples: list[Example]):
    """Each sub-command's --help has an Examples:: epilog with a command of its own, and its overrides'
    ``e.g. key=value`` is a key of that command's config (the override lines are checked above)."""
    for key in docs_check.PARSERS:
        if key == ("eval", "seg", "train"):
            continue
        source = f"sgcl {' '.join(key)} --help"
        text = docs_check._parser(key).format_help()
        assert "Examples::" in text, f"{source}: no Examples:: epilog"
        own = [e for e in help_examples if e.source == source and not e.fragment
               and any(tuple(a[:len(key)]) == key for a in sgcl_argvs(e.text))]
        assert len(own) >= 1, f"{source}: no example of `sgcl {' '.join(key)}` itself"
        if key not in docs_check.PARSE_ONLY:
            overrides = [e for e in help_examples if e.source == source
                         and re.fullmatch(rf"sgcl {' '.join(key)} [\w.]+=\S+", e.text)]
            assert len(overrides) == 1, f"{source}: no key=value example found in the overrides' help"


def test_registry_covers_every_command():
    from evaluation.cli import PROTOCOLS
    from sgcl.cli import COMMANDS

    assert {k[0] for k in docs_check.PARSERS} == set(COMMANDS)
    assert {k[1] for k in docs_check.PARSERS if k[0] == "eval"} >= set(PROTOCOLS)


# -- the checker finds what is broken ----------------------------------------------------------
FAULTS = [
    (["pretrain", "train.lr=0.03"], r"unknown key train\.lr"),  # the old --help example
    (["pretrain", "optim.lr=fast"], r"optim\.lr: expected a number"),
    (["tile", "slide.svs", "--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    (["tile", "slide.svs", "tissue.bogus=1"], r"unknown key tissue\.bogus"),
    (["eval", "knn", "--config", "configs/eval/missing.yaml"], r"configs/eval/missing\.yaml: no such file in the repo"),
    (["eval", "knn", "--config", "configs/eval/linear.yaml", "knn.ks=many"], r"knn\.ks: expected a list"),
    (["eval", "bogus"], r"unknown sub-command 'eval bogus'"),
    (["train"], r"unknown command 'train'"),
    (["eval", "seg", "predict", "--image", "a.png"], r"required: --checkpoint"),
    (["extract", "--encoder"], r"--encoder: expected one argument"),
    (["heatmap", "--level", "1", "--mpp", "2"], r"--mpp: not allowed with argument --level"),
    (["eval", "mil", "--model", "transmil"], r"invalid choice: 'transmil'"),
    (["demo", "epochs=many"], r"epochs: expected an integer"),
]


@pytest.mark.parametrize("argv,message", FAULTS, ids=[" ".join(a) for a, _ in FAULTS])
def test_check_argv_names_the_fault(argv: list[str], message: str):
    error = check_argv(argv)
    assert error is not None and re.search(message, error), error


def test_extraction_and_report_of_a_markdown_file(tmp_path: Path):
    doc = tmp_path / "guide.md"
    doc.write_text(
        "Tile with `sgcl tile SLIDES… --out tiles`, then `sgcl eval knn|linear` or `sgcl extract --out`.\n"
        "```bash\n"
        "# a comment line\n"
        "python3 -m venv .venv && .venv/bin/sgcl demo --out demo_out   # chained\n"
        "sgcl pretrain --config configs/pretrain/tiny_cpu.yaml \\\n"
        "    --h5-dir tiles/patches optim.lr=0.01\n"
        "torchrun --nproc_per_node 4 -m sgcl.cli extract --inputs t --encoder resnet50 ...\n"
        "python -m sgcl heatmap --slides s.svs --features f --out h --normalize sideways\n"
        "```\n"
        "```python\n"
        "sgcl = 1  # not a shell block\n"
        "```\n"
    )
    found = examples_in_markdown(doc, tmp_path)
    assert [(e.line, e.fragment) for e in found] == [(1, True), (1, True), (1, True), (4, False), (5, False), (7, False), (8, False)]
    assert [sgcl_argvs(e.text) for e in found] == [
        [["tile", "SLIDES…", "--out", "tiles"]],
        [["eval", "knn"], ["eval", "linear"]],
        [["extract", "--out"]],
        [["demo", "--out", "demo_out"]],
        [["pretrain", "--config", "configs/pretrain/tiny_cpu.yaml", "--h5-dir", "tiles/patches", "optim.lr=0.01"]],
        [["extract", "--inputs", "t", "--encoder", "resnet50", "..."]],
        [["heatmap", "--slides", "s.svs", "--features", "f", "--out", "h", "--normalize", "sideways"]],
    ]
    errors = [err for e in found for err in check_example(e, REPO)]
    assert len(errors) == 1, errors
    assert errors[0].startswith("guide.md:8: python -m sgcl heatmap") and "invalid choice: 'sideways'" in errors[0]


def test_docs_check_command_line(tmp_path: Path, capsys):
    good, bad = tmp_path / "good.md", tmp_path / "bad.md"
    good.write_text("```\nsgcl tile slide.svs --out tiles --print-config\n```\n")
    bad.write_text("Run `sgcl pretrain train.lr=0.03`.\n")
    assert docs_check.main([str(good)]) == 0
    assert docs_check.main([str(good), str(bad)]) == 1
    out = capsys.readouterr()
    assert "bad.md:1: sgcl pretrain train.lr=0.03" in out.out and "unknown key train.lr" in out.out
    assert "2 documented command lines checked, 1 broken" in out.err
    assert docs_check.main([str(tmp_path / "missing.md")]) == 2
    assert "missing.md does not exist" in capsys.readouterr().err


# -- sgcl --help and the README's two commands ---------------------------------------------------
def test_sgcl_help(capsys):
    from sgcl.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^  {name} ", out, re.MULTILINE) for name in COMMANDS)


def test_readme_commands_cheap_parts():
    """README command 1 ends in `.venv/bin/sgcl demo --out demo_out` (checked, not run); command 2
    installs the `dev` extra and runs pytest on tests/."""
    block = (REPO / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    assert sgcl_argvs(commands[0]) == [["demo", "--out", "demo_out"]]
    assert check_argv(["demo", "--out", "demo_out"]) is None
    assert sgcl_argvs(commands[1]) == [] and '-e ".[dev]"' in commands[1] and commands[1].endswith("pytest -q tests")
    setup_call = ast.parse((REPO / "setup.py").read_text())
    extras = next(ast.literal_eval(k.value) for n in ast.walk(setup_call) if isinstance(n, ast.Call)
                  for k in n.keywords if k.arg == "extras_require")
    assert "pytest" in extras["dev"] and (REPO / "tests" / "conftest.py").is_file()


# -- --print-config ----------------------------------------------------------------------------------
PRINTABLE = [("tile", "slide.svs", "tissue.pen_filter=false"), ("pretrain", "optim.lr=0.01"),
             ("extract", "feature_dtype=float16"), ("eval", "knn", "knn.temperature=0.1"), ("eval", "seg", "train.epochs=20"),
             ("eval", "mil", "model.name=abmil"), ("heatmap", "topk_geometry=both"), ("demo", "knn_k=16")]


@pytest.mark.parametrize("argv", PRINTABLE, ids=lambda a: " ".join(a[:2]))
def test_print_config_round_trips(argv: tuple[str, ...], tmp_path: Path, capsys):
    """--print-config prints the resolved config (the override applied); fed back as --config it
    resolves to the same config."""
    from sgcl.cli import main

    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    key, value = argv[-1].split("=")
    node = yaml.safe_load(printed)
    for part in key.split("."):
        node = node[part]
    assert node == yaml.safe_load(value)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    words = [a for a in argv if "=" not in a and not a.endswith(".svs")]
    assert main([*words, "--config", str(saved), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


CASES = [
    BadInput("pretrain-unknown-key", ("pretrain", "train.lr=0.03", "--print-config"), 2, r"unknown key train\.lr"),
    BadInput("tile-missing-config", ("tile", "--config", "{tmp}/missing.yaml", "--print-config"), 2,
             r"missing\.yaml does not exist"),
    BadInput("extract-bad-value", ("extract", "batch_size=big", "--print-config"), 2, r"batch_size: expected an integer"),
    BadInput("knn-unknown-key", ("eval", "knn", "knn.k=5", "--print-config"), 2, r"unknown key knn\.k\b"),
    BadInput("seg-bad-value", ("eval", "seg", "train.epochs=ten", "--print-config"), 2, r"train\.epochs: expected an integer"),
    BadInput("mil-bad-choice", ("eval", "mil", "model.name=transmil", "--print-config"), 2, r"model\.name: 'transmil'"),
    BadInput("heatmap-bad-choice", ("heatmap", "topk_geometry=circle", "--print-config"), 2, r"topk_geometry"),
    BadInput("demo-bad-type", ("demo", "epochs=many", "--print-config"), 2, r"epochs: expected an integer"),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_print_config_bad_input(case: BadInput, capfd, tmp_path: Path):
    run_case(case, capfd, tmp=tmp_path)
