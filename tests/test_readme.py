"""The README's commands are the ones CI runs."""

from tests.conftest import REPO_ROOT


def _last_command(text):
    return [line for line in text.splitlines() if line.startswith("pip install")]


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ci_command = _last_command(ci)[-1]
    assert ci_command in _last_command(readme), f"README lacks the CI test command: {ci_command}"


def test_readme_gives_exactly_two_setup_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = _last_command(readme)
    assert len(commands) == 2 and all("torch==2.13.0" in c for c in commands)
