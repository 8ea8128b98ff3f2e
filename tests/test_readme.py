"""The README's Python API section runs as written (on the built-in demo model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_section_runs_as_written(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    assert scope["logits"].shape == (1, len(scope["tokenizer"].encode("Hello")), scope["model"].config.vocab_size)
    assert len(scope["results"]) == 2 and all(r.tokens for r in scope["results"])
    assert capsys.readouterr().out.strip()
