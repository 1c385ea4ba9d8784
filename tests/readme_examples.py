"""The README's runnable examples as the tests execute them.

An example's python block has a marker line, ``# -- the imports and all below run as written in tests/...``: the
lines above it are the user's own (model, data, sizes), which the test supplies; its imports and every line below
the marker run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
MARKER = "# -- the imports and all below run as written in tests/"


def readme_example(heading: str) -> str:
    """The first python block after the README heading ``heading``: its imports, then every line below the marker."""
    text = README.read_text()
    assert heading in text, f"the README lost the heading {heading!r}"
    block = re.search(r"```python\n(.*?)```", text.split(heading, 1)[1], re.S)
    assert block is not None, f"no python block after {heading!r}"
    head, marker, tail = block.group(1).partition(MARKER)
    assert marker, f"the example after {heading!r} lost the line below which the test runs it"
    imports = [line for line in head.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(imports) + "\n" + tail.split("\n", 1)[1]
