"""Every ```python block of README.md runs as written on a CPU machine.

Each block runs in its own Python process (nothing shared with the tests or the other blocks),
with CUDA hidden and without Triton's interpreter, as on a user's CPU-only machine.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", markdown, re.MULTILINE | re.DOTALL):
        blocks.append((markdown.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_block_finder_sees_every_python_fence():
    text = README.read_text()
    assert BLOCKS, "README.md has no ```python block"
    assert len(BLOCKS) == len(re.findall(r"^```python", text, re.MULTILINE))
    assert python_blocks("a\n```python\nx = 1\n```\nb\n```python\ny = 2\n```\n") == [(2, "x = 1\n"), (6, "y = 2\n")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_on_cpu(tmp_path, line, code):
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(code)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README.md block at line {line} failed:\n{done.stderr[-4000:]}"
