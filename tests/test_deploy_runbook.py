"""docs/operations.md, the runbook, stays true to the code and to the repository: the
``streambroker …`` commands of its shell blocks parse, with flags the command line defines;
its links and anchors resolve; the benchmark files it cites exist; nothing links its old
name.
"""

from __future__ import annotations

import re

from tests.support.cli_launch import check_flags
from tests.support.deploy_files import INFRA, OPERATIONS, ROOT
from tests.support.runbook import docs_commands, markdown_anchors


def test_the_commands_in_the_runbook_exist() -> None:
    found = list(docs_commands())
    assert any(argv[0] == "api" for _, argv in found)
    for where, argv in found:
        check_flags(argv, where)


def test_nothing_links_the_old_name_of_the_runbook() -> None:
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *ROOT.glob("docs/*.md")]
    for path in [*pages, *INFRA.rglob("*.md")]:
        assert "operating.md" not in path.read_text(), f"{path} links docs/operating.md"


def test_the_runbook_cites_only_recorded_benchmark_files() -> None:
    """Sizing figures point at infra/bench/results/*.md files that exist."""
    text = OPERATIONS.read_text()
    cited = set(re.findall(r"infra/bench/results/([\w.]+\.md)", text))
    assert cited, "docs/operations.md cites no benchmark results"
    for name in cited:
        assert (INFRA / "bench" / "results" / name).exists(), name


def test_the_runbook_links_resolve() -> None:
    text = OPERATIONS.read_text()
    anchors = markdown_anchors(OPERATIONS)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        page, _, anchor = target.partition("#")
        if not page:
            assert anchor in anchors, f"docs/operations.md links #{anchor}"
            continue
        assert (OPERATIONS.parent / page).resolve().exists(), f"docs/operations.md links {page}"
