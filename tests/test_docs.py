"""The documentation: generated references cover the code, includes resolve, the text stays clean.

The configuration, metrics and HTTP API references are generated at build time by
`docs/hooks/reference.py` (an mkdocs hook). These tests fail when a CLI flag, a config field, a
metric the server exports or a route the app answers has no entry there. `make test` also runs
`mkdocs build --strict` (broken links, missing pages, includes of missing files).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
INCLUDE = re.compile(r'^--8<-- "([^"]+)"', re.MULTILINE)


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def configuration(reference) -> str:
    return reference.configuration_reference()


def _table_rows(markdown: str, heading: str) -> str:
    """The text of one `## heading` section."""
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + len(heading))
    return markdown[start : end if end != -1 else None]


def test_every_cli_flag_of_every_command_has_an_entry(reference, configuration):
    parser = reference.build_parser()
    commands = reference.subcommands(parser)
    assert {"serve", "convert", "generate", "distill", "analyze"} <= set(commands)
    missing = []
    for name, sub in commands.items():
        section = _table_rows(configuration, f"## `lln-serve {name}`")
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = action.option_strings or [action.dest.upper()]
            for flag in names:
                entry = (f"| `{flag}`", f", `{flag}`")
                if not any(line.startswith(entry[0]) or entry[1] in line for line in rows):
                    missing.append(f"lln-serve {name} {flag}")
    assert not missing, f"no entry in the configuration reference: {missing}"


def test_every_serve_flag_names_its_environment_variable(configuration):
    section = _table_rows(configuration, "## `lln-serve serve`")
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    assert len(rows) > 20
    for row in rows:
        env = row.split(" | ")[1]
        assert env.startswith("`LLN_SERVE_"), f"no environment variable: {row}"


def test_every_config_field_has_an_entry(configuration):
    from server import config

    for cls in (config.EngineConfig, config.ServerConfig):
        section = _table_rows(configuration, f"### `server.config.{cls.__name__}`")
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in section, f"{cls.__name__}.{field.name}"


def test_defaults_are_the_codes_not_the_environments(reference, monkeypatch):
    monkeypatch.setenv("LLN_SERVE_MAX_NUM_SEQS", "999")
    text = reference.configuration_reference()
    assert "`999`" not in text
    assert "| `--max-num-seqs` | `LLN_SERVE_MAX_NUM_SEQS` | integer | `8` |" in text


def _exported_families() -> set[str]:
    """Family names a real (tiny) engine's registry exports, counters with their `_total`."""
    import torch

    from server.metrics import Metrics
    from tests.conftest import make_char_tokenizer
    from tests.models.conftest import tiny_model
    from tests.server.test_engine import make_engine

    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=4, num_sinks=1)
    metrics = Metrics(make_engine(model, make_char_tokenizer()), "tiny")
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.registry.collect()
    }


def test_every_exported_metric_has_an_entry(reference):
    text = reference.metrics_reference()
    documented = set(re.findall(r"^\| `([a-z0-9_:]+)` \|", text, re.MULTILINE))
    exported = _exported_families()
    assert exported, "the tiny engine exported nothing"
    assert exported <= documented, f"no entry in the metrics reference: {exported - documented}"
    # the CUDA-only gauges are documented on a machine without a GPU too
    assert "lln:gpu_memory_allocated_bytes" in documented
    assert "lln:state_bytes_per_sequence" in documented


def test_every_route_has_an_entry(reference):
    from starlette.routing import Mount

    text = reference.http_reference()
    app = reference.build_app()
    missing = []
    for route in app.routes:
        if isinstance(route, Mount):
            paths = [(route.path + "/{path}", "GET")]
        else:
            paths = [(route.path, m) for m in sorted(route.methods or ()) if m != "HEAD"]
        for path, method in paths:
            if f"| `{method}` | `{path}` |" not in text:
                missing.append(f"{method} {path}")
    assert not missing, f"no entry in the HTTP API reference: {missing}"
    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            assert f"### `{method.upper()} {path}`" in text


def test_the_hook_and_the_reference_pages_are_in_the_site(reference):
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.Loader)
    assert "docs/hooks/reference.py" in config["hooks"]
    assert config.get("strict") is True
    nav = yaml.dump(config["nav"])
    for page in reference.GENERATED:
        assert page in nav, f"{page} is generated but not in the nav"
        assert not (DOCS / page).exists(), f"docs/{page} is generated: do not write it by hand"


def _text_files() -> list[Path]:
    """What the site and the README show: pages, and the results files they include."""
    results = sorted((ROOT / "benchmarks" / "results").rglob("*.md"))
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md")), *results]


def test_every_include_names_a_file_that_exists():
    for path in _text_files():
        for name in INCLUDE.findall(path.read_text()):
            assert (ROOT / name).is_file(), f"{path.relative_to(ROOT)} includes missing {name}"


def test_benchmark_pages_include_their_numbers():
    """Benchmark numbers live in benchmarks/results/; the pages include them (every results
    table is on some page)."""
    included = set()
    for path in sorted((DOCS / "benchmarks").glob("*.md")):
        included |= set(INCLUDE.findall(path.read_text()))
    results = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks" / "results").rglob("*.md")
    }
    assert results - included == set(), (
        f"results files on no page: {sorted(results - included)}; include each in a page under "
        'docs/benchmarks/ with a line --8<-- "benchmarks/results/<file>.md"'
    )


def test_an_included_results_files_headings_go_two_levels_down(reference):
    page = '# Page\n\n## Section\n\n--8<-- "benchmarks/results/x.md"\n\n## Next\n'
    marked = reference.mark_results_includes(page).splitlines()
    at = marked.index('--8<-- "benchmarks/results/x.md"')
    inserted = ["# Results title", "", "```text", "# not a heading", "```", "## Results part"]
    lines = reference.demote_included_headings([*marked[:at], *inserted, *marked[at + 1 :]])
    assert lines == [
        "# Page", "", "## Section", "",
        "### Results title", "", "```text", "# not a heading", "```", "#### Results part",
        "", "## Next",
    ]  # fmt: skip


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_text_speaks_of_the_project_alone(path):
    text = path.read_text()
    for pattern in (r"\bissue \d+", r"\bissues? #\d+", r"\.\./shared", r"\bDESIGN\.md",
                    r"this (session|machine)\b", r"this session's"):  # fmt: skip
        found = re.search(pattern, text, re.IGNORECASE)
        assert found is None, f"{found.group(0)!r} in {path.relative_to(ROOT)}"


def test_readme_is_short_and_its_figures_name_their_results_files():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("make run", "make test"):
        assert command in readme
    assert "from openai import OpenAI" in readme and "curl " in readme
    assert "docs/playground.png" in readme and "docs/state-vs-kv.png" in readme
    table = _table_rows(readme, "## Headline numbers")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 3
    for row in rows[1:]:
        names = re.findall(r"`(benchmarks/results/[\w/]+\.md)`", row)
        assert names, f"a headline figure without its results file: {row}"
        for name in names:
            assert (ROOT / name).is_file(), name
        assert re.search(r"20\d\d-\d\d-\d\d", row), f"a headline figure without its date: {row}"
