"""The README and docs/ point at things that exist: every relative link, every file path, every command
(`python ... script.py`, `python -m module`, `bash script.sh`, `lowbit-adamw SUBCOMMAND`, a recipe or
benchmark named in prose), so a newcomer who follows them never meets a missing file."""
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TOP = ("benchmarks", "recipes", "tests", "scripts", "lowbit_adamw", "kernels", "docs", ".ci")


def text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def code_spans(md: str) -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", md, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", md, flags=re.S))
    return [line for b in blocks for line in b.splitlines()] + inline


def test_the_readme_is_short_and_links_every_docs_page():
    readme = text("README.md")
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"]({page})" in readme, f"README does not link {page}"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_exists(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(base, target.split("#")[0]))
        if not os.path.exists(path):
            missing.append(target)
    assert not missing, f"{page}: links to nothing: {missing}"


def subcommands() -> set[str]:
    from lowbit_adamw import cli

    return set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("page", PAGES)
def test_every_command_and_path_named_exists(page):
    missing = []
    spans = code_spans(text(page))
    for span in spans:
        for script in re.findall(r"(?:^|\s)((?:%s)/[\w./*\[\]-]+)" % "|".join(re.escape(t) for t in TOP), " " + span):
            script = script.rstrip(".,;:)")
            pair = re.fullmatch(r"(.*)\.(\w+)/\.(\w+)", script)  # results/x.json/.png: both files
            for path in ([f"{pair[1]}.{pair[2]}", f"{pair[1]}.{pair[3]}"] if pair else [script]):
                if not glob.glob(os.path.join(ROOT, path)):
                    missing.append(path)
        for script in re.findall(r"\bpython3?\s+(?:-P\s+)?([\w./-]+\.py)\b", span):
            if not os.path.exists(os.path.join(ROOT, script)):
                missing.append(script)
        for module in re.findall(r"\bpython3?\s+(?:-P\s+)?-m\s+([\w.]+)", span):
            if module not in ("pip", "pytest") and importlib.util.find_spec(module) is None:
                missing.append(f"-m {module}")
        for sub in re.findall(r"\blowbit-adamw\s+([a-z][\w-]*)", span):
            if sub not in subcommands():
                missing.append(f"lowbit-adamw {sub}")
    # recipes and benchmarks named in prose (`fit_on_one_gpu.py`) exist in their folder
    for name in set(re.findall(r"`([\w-]+\.py)`", text(page))):
        if not glob.glob(os.path.join(ROOT, "**", name), recursive=True):
            missing.append(name)
    assert not missing, f"{page}: names what does not exist: {sorted(set(missing))}"


def test_the_checks_see_what_they_check():
    """The parsers above must find the README's commands, or the tests pass on nothing."""
    spans = code_spans(text("README.md"))
    assert any("scripts/test.sh" in s for s in spans) and any("python3 -m lowbit_adamw" in s for s in spans)
    assert "memory" in subcommands()
