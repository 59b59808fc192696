"""The README's Python example runs as written, its `meteor` commands (and those of docs/) parse and name the
results they wrote, and its links land on headings."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_python_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "paper-242" in capsys.readouterr().out


def _readme_commands() -> list[str]:
    """Every concrete `meteor ...` command of the code lines of the README and the pages of docs/ (not the usage
    lines with [options]), its continuation lines joined and the page's shell variables filled in."""
    commands = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        env = dict(re.findall(r"^\s*([A-Z_]+)=(\S+)", text, flags=re.M))
        for line in text.splitlines():
            if not line.startswith("    "):  # code lines only
                continue
            for piece in line.split("#")[0].split("&&"):
                piece = re.sub(r"\$([A-Z_]+)", lambda m: env[m.group(1)], piece.strip())
                if piece.startswith("meteor ") and "[" not in piece:
                    commands.append(piece)
    return commands


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-', a
    repeated one suffixed -1, -2 ... (code blocks fenced with ``` hold no headings)."""
    seen, fenced = set(), False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        base = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        slug, n = base, 0
        while slug in seen:
            n += 1
            slug = f"{base}-{n}"
        seen.add(slug)
    return seen


def test_readme_and_docs_links_land_on_headings():
    """Every relative link of the README and docs/ names a file of the repository and, with a #fragment, a heading
    of that page: moving or renaming a section cannot leave a link dangling."""
    anchors = {page.resolve(): _anchors(page.read_text()) for page in PAGES}
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            path = (page.parent / file).resolve() if file else page.resolve()
            assert path.exists(), f"{page.name}: {target} names no file"
            if fragment:
                assert fragment in anchors.get(path, set()), f"{page.name}: {target} names no heading"
                checked += 1
    assert checked >= 100


def test_readme_meteor_commands_parse():
    """Every concrete `meteor ...` command the README shows (not the usage lines with [options]) is
    accepted by the CLI's parser as written, shell variables of the same page filled in."""
    import shlex

    from meteor_vlm.cli import build_parser

    commands = _readme_commands()
    assert any(c.startswith("meteor train") for c in commands) and "meteor demo" in commands
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            raise AssertionError(f"the README's command does not parse: {command}") from None


def test_readme_commands_table_names_every_method_pattern():
    """The commands table's `meteor methods` row, written by hand, names every pattern the parser accepts (its
    prefix up to the first setting), so a new peer cannot be left out of it."""
    from meteor_vlm.bench.accuracy import NAME_PATTERNS

    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `meteor methods`"))
    for p in NAME_PATTERNS:
        for usage in p.usage.split(", "):
            prefix = usage.split("<")[0]
            assert f"`{prefix}<" in row, f"the README's `meteor methods` row does not name {usage}"


def test_readme_bench_commands_match_the_results_they_wrote():
    """Each `meteor bench ... --out results/X` the README shows names what the committed results/X/results.json
    holds: the same model (an embedded one by any of its names; a scratch folder's results are not checked for it),
    split seed, samples per family and methods in the same order. A command edited without rerunning it, or a
    results folder rerun with other settings, fails here."""
    import json
    import shlex

    from meteor_vlm.cli import build_parser
    from meteor_vlm.default import EMBEDDED

    root = ROOT
    parser = build_parser()
    checked = 0
    for command in (c for c in _readme_commands() if c.startswith("meteor bench ")):
        args = parser.parse_args(shlex.split(command)[1:])
        path = root / (args.out or "") / "results.json"
        if not (args.out and args.out.startswith("results") and path.is_file()):
            continue
        results = json.loads(path.read_text())
        where = f"README: {command[:80]}"
        if results["model"] in EMBEDDED:
            assert EMBEDDED.get(args.model) == EMBEDDED[results["model"]], where
        assert (args.seed, args.samples) == (results["seed"], results["samples_per_family"]), where
        assert args.methods.split(",") == [r["method"] for r in results["rows"]], where
        checked += 1
    assert checked >= 40
