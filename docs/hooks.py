"""mkdocs hook: `<!-- surgery-help COMMAND -->` in a page becomes that command's `--help`, so option lists stay true.

An unknown command fails the build.
"""

from __future__ import annotations

import re

from click.testing import CliRunner

from surgery.cli import main

_MARKER = re.compile(r"<!-- surgery-help ([\w-]+) -->")


def on_page_markdown(markdown: str, **_kwargs: object) -> str:
    return _MARKER.sub(lambda match: command_help(match.group(1)), markdown)


def command_help(command: str) -> str:
    """The `surgery COMMAND --help` text as a fenced block, 100 columns wide."""
    result = CliRunner().invoke(main, [command, "--help"], prog_name="surgery", terminal_width=100,
                                max_content_width=100)
    if result.exit_code != 0 or command not in main.commands:
        raise ValueError(f"surgery-help: no command {command!r}")
    return f"```text\n{result.output.rstrip()}\n```"
