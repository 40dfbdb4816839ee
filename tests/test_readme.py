"""The README's test command is the one .ci/run runs, and its commands exist."""

from __future__ import annotations

import re

from conftest import REPO


def fenced_commands(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_test_command_is_what_ci_runs():
    readme = fenced_commands((REPO / "README.md").read_text())
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    test_command = next(c for c in readme if c.endswith("&& pytest"))
    assert test_command in ci_lines


def test_readme_install_command_runs_the_main_job():
    readme = fenced_commands((REPO / "README.md").read_text())
    assert readme[0].startswith("pip install") and " && qvl chat " in readme[0]


def test_readme_install_command_is_what_ci_readme_runs():
    """.ci/readme installs with the README's first command exactly (its install part, no extras)."""
    install = fenced_commands((REPO / "README.md").read_text())[0].split(" && ")[0]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "readme").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert install == "pip install -c constraints.txt ."
    assert install in ci_lines
    script = (REPO / ".ci" / "readme").read_text()
    for step in ("scripts/demo.sh", "qvl launch", "qvl chat", "qvl batch", "qvl terminate"):
        assert step in script, step


def test_the_quantized_count_in_the_docs_is_the_catalogues():
    from qwenvl_cli.catalogue.load import load_catalogue
    from qwenvl_cli.catalogue.resolve import spec_rows

    words = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
    rows = spec_rows(load_catalogue())
    quantized = sum(r["quantization"] != "none" for r in rows)
    sentence = f"{words[quantized]} of the {words[len(rows)]} specs are quantized"
    for doc in ("README.md", "docs/quantization.md"):
        text = " ".join((REPO / doc).read_text().split()).lower()
        assert sentence in text, (doc, sentence)
