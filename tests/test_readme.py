"""README stays true: CI runs its exact commands."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].strip() for block in quickstart.split("```bash")[1:]]


def test_ci_runs_both_quickstart_commands_verbatim():
    commands = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(commands) == 2
    install_and_demo, tests = (c.split("\n```")[0].strip() for c in commands)
    assert install_and_demo in ci and "surgery demo" in install_and_demo
    assert tests in ci.splitlines(), "the README's test command must stand alone on a line of .ci/run"
