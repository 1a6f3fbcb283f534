"""CI runs the README's test command: the line in .ci/run must be the one in the README's Tests block."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r'^TEST_CMD="(.*)"$', ci, flags=re.M)
    assert match, ".ci/run must define TEST_CMD"
    readme = (ROOT / "README.md").read_text()
    tests_block = readme.split("**Tests**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert tests_block.strip() == match.group(1)
    assert 'eval "$TEST_CMD"' in ci
