"""Every result file the README, the studies' README and the H200 history cite exists in bench/results: a figure
whose file is gone can no longer be checked."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Result files are named for the machine or the question: h200-..., cpu-..., convert-...
CITED = re.compile(r"(?<![\w-])((?:h100|h200|cpu|convert|grammar|quant|server|small-pair)-[\w.-]*?\.(?:json|log|md))")


def cited_names(document: Path) -> set:
    return set(CITED.findall(document.read_text()))


def test_the_docs_cite_result_files_that_exist():
    for document in (ROOT / "README.md", ROOT / "bench" / "studies" / "README.md", RESULTS / "h200-history.md"):
        names = cited_names(document)
        assert names, document  # the pattern still finds the citations
        missing = sorted(name for name in names if not (RESULTS / name).is_file())
        assert not missing, f"{document.name} cites {missing}"


def test_the_pattern_finds_a_citation_and_skips_other_names(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("see `bench/results/h200-x-1.json` and h100-decode-profile.md, not config.json or -b.json")
    assert cited_names(document) == {"h200-x-1.json", "h100-decode-profile.md"}
