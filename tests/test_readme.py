"""The README's examples marked `<!-- readme-example: NAME -->` run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = dict(re.findall(r"<!-- readme-example: (\S+) -->\s*```python\n(.*?)```", README.read_text(), re.S))


def test_examples_are_found():
    assert "pipelines" in EXAMPLES


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(EXAMPLES[name])
    done = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if name == "pipelines":
        assert "Paris" in done.stdout and "2 8 384" in done.stdout
