"""The README's custom-policy example runs as printed (the block after ``<!-- example: custom-policy -->``)."""

from __future__ import annotations

import re
from pathlib import Path

from kvstore.evict import POLICIES

README = Path(__file__).parents[2] / "README.md"
MARKER = "<!-- example: custom-policy -->"


def test_readme_custom_policy_example_runs(capsys):
    text = README.read_text()
    assert MARKER in text, f"{README} has no {MARKER!r} marker"
    block = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert block is not None, f"no ```python block right after {MARKER!r} in {README}"
    before = set(POLICIES)
    try:
        exec(compile(block.group(1), f"{README}:custom-policy", "exec"), {"__name__": "readme_example"})
    finally:
        added = set(POLICIES) - before
        for name in added:
            del POLICIES[name]
    assert added, "the example registers no policy"
    out = capsys.readouterr().out
    assert "hit ratio" in out, out
