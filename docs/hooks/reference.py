"""The docs' generated references: configuration, metrics and HTTP API, from the code.

An mkdocs hook (`hooks:` in mkdocs.yml): at build time it adds three pages that nobody writes
by hand, and copies the benchmark plots next to the benchmark pages.

- `reference/configuration.md`: every flag of every `lln-serve` command, read from the CLI's
  argparse parser (`server.cli.build_parser`), and the fields of the config dataclasses
  (`server.config.EngineConfig`, `ServerConfig`).
- `reference/metrics.md`: every metric family the server's Prometheus registry collects
  (`server.metrics.Metrics`, on a stand-in engine that answers zero to everything).
- `reference/http-api.md`: every route of the FastAPI app (`server.api.build_app`), with its
  request and response schemas from the app's OpenAPI document.

A results file included into a page (`--8<-- "benchmarks/results/..."`, pymdownx.snippets)
keeps its own headings one level below the page's sections, so the page's table of contents
stays the page's.

`tests/test_docs.py` checks that every flag, metric and route has an entry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
GENERATED = {
    "reference/configuration.md": "configuration_reference",
    "reference/metrics.md": "metrics_reference",
    "reference/http-api.md": "http_reference",
}
ENV_PREFIX = "LLN_SERVE_"


def _import_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# ---- configuration ---------------------------------------------------------------------------


@contextlib.contextmanager
def _clean_environment():
    """The serve parser's defaults read LLN_SERVE_* variables: document the code's defaults."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def build_parser() -> argparse.ArgumentParser:
    _import_path()
    from server.cli import build_parser as cli_parser

    with _clean_environment():
        return cli_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_help(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    default = action.default
    if default is None or default == "":
        return "-"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(action, argparse._StoreConstAction) and default == "0":
        return "off"
    return f"`{default}`"


def _value(action: argparse.Action) -> str:
    if action.choices:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.nargs == 0:
        return "switch"
    kind = action.type
    if kind is None:
        return "text"
    name = getattr(kind, "__name__", str(kind)).lstrip("_")
    names = {"str": "text", "int": "integer", "float": "number", "Path": "path",
             "positive_int": "integer >= 1", "non_negative_int": "integer >= 0"}  # fmt: skip
    return names.get(name, name)


def _names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest.upper()}` (positional)"
    return ", ".join(f"`{s}`" for s in action.option_strings)


def flag_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str, str, str]]:
    """(flags, env, value, default, help) for every argument but -h."""
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        env = ""
        found = re.search(r"\s*\[env ([A-Z0-9_]+)(=1)?\]", text)
        if found:
            env = f"`{found.group(1)}`" + (" (`1`)" if found.group(2) else "")
            text = text[: found.start()] + text[found.end() :]
        rows.append((_names(action), env, _value(action), _default(action), text))
    return rows


def _docstring_fields(cls) -> dict[str, str]:
    """`name: text` paragraphs of a dataclass docstring (continuation lines indented alike)."""
    fields, current = {}, None
    names = {f.name for f in dataclasses.fields(cls)}
    for line in (cls.__doc__ or "").splitlines():
        line = line.strip()
        head = re.match(r"([a-z_ /]+):\s*(.*)", line)
        if head and all(n.strip() in names for n in head.group(1).split("/")):
            current = [n.strip() for n in head.group(1).split("/")]
            for name in current:
                fields[name] = head.group(2)
        elif current and line:
            for name in current:
                fields[name] += " " + line
        else:
            current = None
    return fields


def _source_comments(cls) -> dict[str, str]:
    """Trailing `# comments` on a dataclass's field lines."""
    import inspect

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        found = re.match(r"\s+([a-z_]+): [^#]+#\s*(.+)", line)
        if found:
            comments[found.group(1)] = found.group(2)
    return comments


def dataclass_rows(cls) -> list[tuple[str, str, str, str]]:
    described = {**_source_comments(cls), **_docstring_fields(cls)}
    rows = []
    for field in dataclasses.fields(cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        text = described.get(field.name, "")
        rows.append((f"`{field.name}`", f"`{kind}`", f"`{default!r}`", text))
    return rows


def configuration_reference() -> str:
    _import_path()
    from server import config

    parser = build_parser()
    out = [
        "# Configuration reference",
        "",
        "Generated when the docs are built, from the `lln-serve` command line's parser "
        "(`server/cli.py`) and the configuration dataclasses (`server/config.py`); not edited "
        "by hand. A guide to the settings that matter is on the "
        "[Configuration](../configuration.md) page.",
        "",
        "Every flag of `lln-serve serve` can also be given as an environment variable, named "
        "in the table; a flag on the command line wins over the variable. A switch "
        "(`--flag` / `--no-flag`) takes `1`/`0` or `true`/`false` in its variable.",
        "",
    ]
    for name, sub in subcommands(parser).items():
        text = _command_help(parser, name)
        out += [f"## `lln-serve {name}`", "", text[:1].upper() + text[1:] + ".", ""]
        out += ["```text", sub.format_usage().strip(), "```", ""]
        rows = flag_rows(sub)
        with_env = any(r[1] for r in rows)
        head = ["flag", *(["environment variable"] if with_env else []), "value", "default",
                "meaning"]  # fmt: skip
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for flags, env, value, default, text in rows:
            cells = [flags, *([env or "-"] if with_env else []), value, default, _cell(text)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "## Configuration dataclasses",
        "",
        "`lln-serve serve` builds these two frozen dataclasses from its flags; the offline API "
        "(`server.llm.LLM`) and the tests build them directly. Both validate their values "
        "when constructed (a `ValueError` that names the field).",
        "",
    ]
    for cls in (config.EngineConfig, config.ServerConfig):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out += [f"### `{cls.__module__}.{cls.__name__}`", "", doc, ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for row in dataclass_rows(cls):
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
        out.append("")
    return "\n".join(out)


# ---- metrics ---------------------------------------------------------------------------------


class _Zero:
    """A stand-in engine: every attribute is another stand-in, every number zero, every call an
    empty list. The collectors only read the engine, so this lists what they register."""

    def __getattr__(self, name: str) -> _Zero:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Zero()
        object.__setattr__(self, name, value)
        return value

    def __call__(self, *args, **kwargs) -> list:
        return []

    def __float__(self) -> float:
        return 0.0

    def __int__(self) -> int:
        return 0

    def __index__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return True

    def __iter__(self):
        return iter(())


def metric_families(*, cuda: bool) -> dict[str, dict]:
    """name -> {type, help, labels} of every family the server's registry collects."""
    _import_path()
    import torch

    from server.metrics import Metrics

    patches = []
    if cuda:
        patches = [
            mock.patch.object(torch.cuda, "is_available", lambda: True),
            mock.patch.object(torch.cuda, "memory_allocated", lambda *a, **k: 0),
            mock.patch.object(torch.cuda, "memory_reserved", lambda *a, **k: 0),
        ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        metrics = Metrics(_Zero(), "MODEL")
        declared = {}
        for collector, names in metrics.registry._collector_to_names.items():
            for name in names:
                declared.setdefault(name, tuple(getattr(collector, "_labelnames", ())))
        families = {}
        for family in metrics.registry.collect():
            labels = set(declared.get(family.name, ()))
            for sample in family.samples:
                labels |= set(sample.labels)
            labels -= {"le", "quantile"}
            families[family.name] = {
                "type": family.type,
                "help": family.documentation,
                "labels": sorted(labels),
            }
    return families


def _exposed(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def metrics_reference() -> str:
    everywhere = metric_families(cuda=False)
    with_cuda = metric_families(cuda=True)
    out = [
        "# Metrics reference",
        "",
        "Generated when the docs are built from the collectors registered in "
        "`server/metrics.py` (`GET /metrics`, Prometheus text format); not edited by hand. "
        "What to watch and the alerts are on the [Metrics and alerts](../metrics.md) page.",
        "",
        "Every `lln:` series carries the label `model_name` (the served model's name). "
        "Counters are exposed with the suffix `_total`, histograms as `_bucket`, `_sum` and "
        "`_count`.",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
    ]

    def order(item):
        name = item[0]
        return (not name.startswith("lln:"), name)

    for name, info in sorted(with_cuda.items(), key=order):
        labels = ", ".join(f"`{label}`" for label in info["labels"]) or "-"
        text = info["help"] + (" On CUDA only." if name not in everywhere else "")
        out.append(
            f"| `{_exposed(name, info['type'])}` | {info['type']} | {labels} | {_cell(text)} |"
        )
    out.append("")
    return "\n".join(out)


# ---- HTTP API --------------------------------------------------------------------------------


def build_app():
    _import_path()
    from server.api import ServerState, build_app

    return build_app(ServerState(model_names=["smollm2-135m-lln"]))


def routes(app) -> list[tuple[str, str]]:
    """(METHOD, path) of every route the app answers, mounts as `path/...`."""
    from starlette.routing import Mount

    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("GET", route.path + "/{path}"))
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                found.append((method, route.path))
    return found


def _schema_type(schema: dict) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        kinds = [_schema_type(s) for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = any(s.get("type") == "null" for s in schema["anyOf"])
        return " or ".join(kinds) + (" or null" if nullable else "")
    if "enum" in schema:
        return " \\| ".join(f"`{v!r}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']!r}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_schema_type(schema.get('items', {}))}"
    if (
        kind == "object"
        and "additionalProperties" in schema
        and isinstance(schema["additionalProperties"], dict)
    ):
        return f"object of {_schema_type(schema['additionalProperties'])}"
    return str(kind)


def _schema_section(name: str, schema: dict) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [_cell(schema["description"]), ""]
    properties = schema.get("properties")
    if not properties:
        out += [f"Type: {_schema_type(schema)}.", ""]
        return out
    required = set(schema.get("required", ()))
    out += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for field, spec in properties.items():
        default = f"`{json.dumps(spec['default'])}`" if "default" in spec else "-"
        out.append(
            f"| `{field}` | {_schema_type(spec)} | {'yes' if field in required else ''} | "
            f"{_cell(default)} | {_cell(spec.get('description', ''))} |"
        )
    extra = schema.get("additionalProperties")
    if extra is False:
        out += ["", "Other fields are refused (400)."]
    out.append("")
    return out


def http_reference() -> str:
    app = build_app()
    document = app.openapi()
    out = [
        "# HTTP API reference",
        "",
        "Generated when the docs are built from the server's OpenAPI document "
        "(`GET /openapi.json` on a running server, rendered at `/docs`) and its route table; "
        "not edited by hand. How to use the API is under [Using the API](../api/index.md).",
        "",
        "## Routes",
        "",
        "| method | path | summary | responses |",
        "|---|---|---|---|",
    ]
    documented = set()
    sections = []
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            documented.add((method.upper(), path))
            codes = ", ".join(sorted(op.get("responses", {})))
            summary = op.get("summary", "")
            out.append(f"| `{method.upper()}` | `{path}` | {_cell(summary)} | {codes} |")
            sections += _operation_section(method.upper(), path, op)
    others = [(m, p) for m, p in routes(app) if (m, p) not in documented]
    for method, path in others:
        out.append(f"| `{method}` | `{path}` | {_undocumented(path)} | |")
    out += ["", "## Operations", "", *sections, "## Schemas", ""]
    for name, schema in sorted(document.get("components", {}).get("schemas", {}).items()):
        out += _schema_section(name, schema)
    return "\n".join(out)


def _undocumented(path: str) -> str:
    if path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
        return "FastAPI's OpenAPI document and its viewers"
    return "the web playground (not in the OpenAPI document; `--no-ui` turns it off)"


def _operation_section(method: str, path: str, op: dict) -> list[str]:
    out = [f"### `{method} {path}`", ""]
    if op.get("description"):
        out += [op["description"].strip(), ""]
    params = op.get("parameters", [])
    if params:
        out += ["| parameter | in | type | required |", "|---|---|---|---|"]
        for param in params:
            out.append(
                f"| `{param['name']}` | {param['in']} | {_schema_type(param.get('schema', {}))} "
                f"| {'yes' if param.get('required') else ''} |"
            )
        out.append("")
    body = op.get("requestBody", {}).get("content", {})
    for media, spec in body.items():
        out += [f"Request body ({media}): {_schema_type(spec.get('schema', {}))}", ""]
    for code, response in sorted(op.get("responses", {}).items()):
        content = response.get("content", {})
        kinds = [
            f"{_schema_type(spec.get('schema', {}))} ({media})"
            for media, spec in content.items()
            if spec.get("schema")
        ]
        text = _cell(response.get("description", ""))
        out.append(f"- **{code}** {text}" + (f": {', '.join(kinds)}" if kinds else ""))
    out.append("")
    return out


# ---- included results files ------------------------------------------------------------------

RESULTS_INCLUDE = re.compile(r'^(--8<-- "benchmarks/results/[^"]+")[ \t]*$', re.MULTILINE)
INCLUDE_START, INCLUDE_END = "<!-- results-include -->", "<!-- /results-include -->"


def mark_results_includes(markdown: str) -> str:
    """Put markers around each results file's include, for `DemoteIncludedHeadings`."""
    return RESULTS_INCLUDE.sub(f"{INCLUDE_START}\n\\1\n{INCLUDE_END}", markdown)


def demote_included_headings(lines: list[str]) -> list[str]:
    """Lines between the markers (the included file, once snippets has inserted it) get their
    headings two levels lower (`#` -> `###`); the markers go."""
    out, inside, fenced = [], 0, False
    for line in lines:
        if line.strip() in (INCLUDE_START, INCLUDE_END):
            inside += 1 if line.strip() == INCLUDE_START else -1
            continue
        if inside and line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if inside and not fenced and re.match(r"#{1,4} ", line):
            line = "##" + line
        out.append(line)
    return out


def demote_extension():
    from markdown.extensions import Extension
    from markdown.preprocessors import Preprocessor

    class Demote(Preprocessor):
        def run(self, lines):
            return demote_included_headings(lines)

    class DemoteIncludedHeadings(Extension):
        def extendMarkdown(self, md):
            # pymdownx.snippets inserts the files at priority 32; this runs right after it
            md.preprocessors.register(Demote(md), "demote_included_headings", 31)

    return DemoteIncludedHeadings()


# ---- mkdocs hooks ----------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, function in GENERATED.items():
        files.append(File.generated(config, uri, content=globals()[function]()))
    # the benchmark pages show the plots their results files sit beside
    for png in sorted(RESULTS.rglob("*.png")):
        uri = "benchmarks/" + png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_config(config):
    # snippets and generated pages read the repository: watch it when serving
    config.watch.extend(str(ROOT / p) for p in ("server", "benchmarks/results", "CHANGELOG.md"))
    config.markdown_extensions.append(demote_extension())
    return config


def on_page_markdown(markdown, page, config, files):
    return mark_results_includes(markdown)
