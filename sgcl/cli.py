"""The ``sgcl`` console command: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``main(argv: list[str] | None) -> int``;
this file only dispatches, so ``sgcl --help`` stays fast (nothing heavy is imported). A config error or
a filesystem error (read-only output folder, disk full, no permission) that a subcommand does not handle
ends here as one line naming the key or path, with exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Callable

from sgcl import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "tile": ("preprocessing.tile", "tile slides into per-slide HDF5 patch files + QC + manifest"),
    "pretrain": ("sgcl.pretrain", "self-supervised pretraining (SGCL, MoCo v2, SimCLR) on HDF5 patches"),
    "extract": ("evaluation.extract", "export per-slide features for MIL (CLAM/TRIDENT .h5 and .pt)"),
    "eval": ("evaluation.cli", "evaluation protocols: knn | linear | fewshot | seg | mil"),
    "heatmap": ("evaluation.heatmap_cli", "per-patch scores (MIL attention, any score) drawn on the slides"),
    "demo": ("sgcl.demo", "run the whole pipeline on the demo slide shipped in the repo"),
}


def examples_epilog(doc: str, keep: Callable[[str], bool] | None = None) -> str:
    """The ``Examples::`` block of a module docstring, as an argparse epilog (RawDescriptionHelpFormatter).

    ``keep`` picks entries by their command line; an entry is a command line with its ``\\``
    continuation lines and the ``#`` comment lines right above it. By default every entry is kept.
    """
    lines: list[str] = []
    comments: list[str] = []
    continued = kept = False
    for line in doc.split("Examples::", 1)[1].splitlines():
        text = line.strip()
        if line and not line[0].isspace():
            break  # the prose after the indented examples
        if continued:
            lines += [line] if kept else []
        elif text.startswith("#"):
            comments.append(line)
        elif text:
            kept = keep is None or keep(text)
            lines += [*comments, line] if kept else []
            comments = []
        else:
            comments = []
        continued = bool(text) and not text.startswith("#") and text.endswith("\\")
    return "Examples::\n\n" + "\n".join(lines) + "\n"


def _usage() -> str:
    lines = [f"sgcl {__version__}", "", "usage: sgcl <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `sgcl <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sgcl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    from sgcl.config import ConfigError
    from sgcl.utils.atomic import os_error_message

    STORAGE_HINTED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # messages with a fix
    from sgcl.utils.threads import release_threads

    module = importlib.import_module(module_name)
    try:
        return int(module.main(rest) or 0)
    except ConfigError as exc:  # a wrong key or value: the message names it, no traceback needed
        print(f"sgcl {name}: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only or full output folder, no permission: the message names the path
        if os.environ.get("SGCL_DEBUG"):
            raise
        message = os_error_message(exc)
        if exc.errno not in STORAGE_HINTED:  # not a known storage fault: say how to see where it came from
            message += " (SGCL_DEBUG=1 shows where it happened)"
        print(f"sgcl {name}: {message}", file=sys.stderr)
        return 2
    finally:
        release_threads()  # a command's thread plan ends with it (in-process callers: tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
