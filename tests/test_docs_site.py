"""The documentation site: every example on its pages runs as written, and the code cites only
documents that are in the repository.

The guides' own examples are run by ``test_docs_examples.py`` and ``test_integrations_docs.py``;
this module runs the pages the site added (getting started, the migration guides).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def run_page(page: str) -> dict[str, Any]:
    """Execute every ``python`` block of ``docs/<page>`` in one namespace, in order."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)
    assert blocks, f"docs/{page} has no python example"
    namespace: dict[str, Any] = {"__name__": "example"}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)
    return namespace


async def statuses(app: Any, path: str, times: int) -> list[int]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [(await client.get(path)).status_code for _ in range(times)]


def test_getting_started_example_refunds_the_unused_reservation() -> None:
    namespace = run_page("index.md")  # it runs its own anyio.run(ask, ...)
    stats = namespace["limits"].get_stats()
    assert stats["granted"] == 1
    assert stats["refunded"] > 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_concurry_guide_serves_threads_and_tasks_from_one_set(backend: str) -> None:
    namespace = run_page("migrating/concurry.md")
    assert namespace["ask_in_a_thread"]() == 873
    assert anyio.run(namespace["ask"], backend=backend) == 873
    assert namespace["limits"].get_stats()["granted"] == 2


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_aiolimiter_guide_admits_the_burst_of_max_rate(backend: str) -> None:
    namespace = run_page("migrating/aiolimiter.md")
    assert sorted(anyio.run(namespace["main"], backend=backend)) == list(range(100))
    assert not namespace["limits"].try_acquire().successful  # the 101st waits a minute


def test_slowapi_guide_answers_429_after_five_a_minute() -> None:
    namespace = run_page("migrating/limits-slowapi.md")
    codes = anyio.run(statuses, namespace["app"], "/search?q=x", 6)
    assert codes == [200] * 5 + [429]


def test_fastapi_limiter_guide_answers_429_after_two() -> None:
    namespace = run_page("migrating/fastapi-limiter.md")
    assert anyio.run(statuses, namespace["app"], "/", 3) == [200, 200, 429]


@pytest.mark.parametrize(
    ("module", "page"),
    [("aiolimits", "aiolimits"), ("aiolimits.redis", "redis"), ("aiolimits.testing", "testing")],
)
def test_api_reference_lists_every_public_name(module: str, page: str) -> None:
    public = __import__(module, fromlist=["__all__"]).__all__
    text = (DOCS / "reference" / f"{page}.md").read_text()
    missing = [name for name in public if f"::: {module}.{name}\n" not in text]
    assert not missing, f"docs/reference/{page}.md lacks {missing}"


def test_api_reference_renders_every_integration_module_with_its_members() -> None:
    import aiolimits.integrations as package

    text = (DOCS / "reference" / "integrations.md").read_text()
    for name in ("httpx", "starlette", "fastapi", "aiohttp", "headers"):
        assert f"::: aiolimits.integrations.{name}\n    options:\n      members: true" in text
    assert package.__doc__ is not None


def _blocks(page: Path) -> list[str]:
    """Every Python block of a page: ``python`` (complete examples) and ``py`` (fragments)."""
    return re.findall(r"```py(?:thon)?\n(.*?)```", page.read_text(), flags=re.DOTALL)


_PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md", ROOT / "CONTRIBUTING.md"]


@pytest.mark.parametrize("page", _PAGES, ids=[str(p.relative_to(ROOT)) for p in _PAGES])
def test_every_python_block_of_the_site_is_valid_python(page: Path) -> None:
    # Complete examples run in the tests of their pages; fragments (an ``async with`` on its own,
    # a ``>>>`` session) must at least be Python that compiles, so an API rename breaks a test.
    for block in _blocks(page):
        lines = block.splitlines()
        source = block
        if lines and lines[0].startswith(">>>"):  # a session: its input lines only
            source = "\n".join(line[4:] for line in lines if line.startswith((">>>", "...")))
        # As the body of a coroutine: a fragment may ``await`` or ``return`` as it would there.
        body = textwrap.indent(source, "    ") or "    pass"
        compile(f"async def fragment():\n{body}\n    pass\n", str(page), "exec")


def _repository_text() -> list[tuple[Path, int, str]]:
    return [
        (path, number, line)
        for folder in ("aiolimits", "tests", "benchmarks", "docs", "scripts")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file() and path.suffix in {".py", ".lua", ".md", ""}
        if path.name != "test_docs_site.py"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
    ]


def test_the_code_cites_only_documents_in_the_repository() -> None:
    # The contract is docs/semantics.md and the house style CONTRIBUTING.md; the documents they
    # grew from are not in the repository, so a comment citing them would point nowhere.
    cited = re.compile(r"\bSPEC\b|\bSTYLE\.md\b")
    text = _repository_text()
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p, n, line in text if cited.search(line)]
    assert not offenders, f"cite docs/semantics.md or CONTRIBUTING.md instead: {offenders}"
    sections = set(re.findall(r"^## §(\d+) ", (DOCS / "semantics.md").read_text(), re.MULTILINE))
    dangling = [
        f"{p.relative_to(ROOT)}:{n}"
        for p, n, line in text
        for section in re.findall(r"semantics §(\d+)", line)
        if section not in sections
    ]
    assert not dangling, f"cite a section docs/semantics.md has: {dangling}"
