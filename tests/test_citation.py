"""CITATION.cff is valid CFF 1.2.0 for this software and cites the papers of the methods it implements.

With PyYAML installed the file is parsed; without it (it is not a dependency) the same facts are checked on the text,
whose layout is the plain subset of YAML the file uses (two-space indents, `- ` list items, `key: value`)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# arXiv ids of the implemented methods: MSM, EDM, PaDIS, Ambient Diffusion, DPS, Jalal et al., Song et al. (medical
# inverse problems; score SDE), DDS. MGDM (IEEE TPAMI 2024) is cited by its journal.
ARXIV_IDS = {"2505.11853", "2206.00364", "2406.02462", "2305.19256", "2209.14687", "2108.01368", "2111.08005",
             "2011.13456", "2303.05754"}


def _text() -> str:
    with open(os.path.join(ROOT, "CITATION.cff"), encoding="utf-8") as f:
        return f.read()


def _references_from_text(text: str) -> list[dict]:
    """The references list: each item's top-level scalar fields and its author count."""
    body = text.split("\nreferences:\n", 1)[1]
    items = re.split(r"^  - ", body, flags=re.M)[1:]
    references = []
    for item in items:
        fields = dict(re.findall(r"^(?:    )?([a-z-]+): \"?(.*?)\"?$", "    " + item, flags=re.M))
        fields["authors"] = re.findall(r"family-names: \"(.+)\"|^\s+- name: \"(.+)\"", item, flags=re.M)
        references.append(fields)
    return references


def test_citation_cff_is_valid_and_complete():
    text = _text()
    assert "\t" not in text
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        data = yaml.safe_load(text)
        top = {k: str(v) for k, v in data.items() if not isinstance(v, list | dict)}
        authors = data["authors"]
        references = [{**r, "year": str(r["year"])} for r in data["references"]]
    else:
        top = dict(re.findall(r"^([a-z-]+): \"?(.*?)\"?$", text, flags=re.M))
        authors = re.findall(r"^  - name: \"(.+)\"$", text.split("\nreferences:\n", 1)[0], flags=re.M)
        references = _references_from_text(text)
    assert top["cff-version"] == "1.2.0"
    assert top["type"] == "software" and top["license"] == "MIT"
    assert top["message"] and top["title"]
    assert len(authors) >= 1
    for ref in references:
        assert ref["type"] in ("article", "conference-paper"), ref
        assert ref["title"] and ref["authors"] and re.fullmatch(r"20\d\d", str(ref["year"])), ref
        assert str(ref["url"]).startswith("https://"), ref
    cited = {m for ref in references for m in re.findall(r"arxiv\.org/abs/(\d{4}\.\d{5})", str(ref["url"]))}
    assert cited == ARXIV_IDS
    assert any("Measurement Guidance in Diffusion Models" in ref["title"] for ref in references)
