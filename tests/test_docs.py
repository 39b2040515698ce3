"""Every code block of README.md and docs/*.md runs exactly as a reader copies it, under the
convention of tests/doc_pages.py (the one executor), and the pages stay honest around those
blocks: the README's two install commands (which cannot run here) are held to `.ci/run` and to
`train.py`, links resolve, docs/layout.md names the package's modules, and docs/results.md is
what benchmarks/results_page.py renders from the JSON in the tree.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess

import pytest

from tests.doc_pages import (
    BASH_TIMEOUT_S,
    FENCE,
    NOT_RUN,
    REPO,
    RUN,
    Block,
    blocks,
    page_id,
    pages,
    run_block,
    run_page,
    workspace,
)

# docs/cli.md runs in tests/test_cli_docs.py, which also checks what its tiny models learned
OWN_TEST = {"docs/cli.md"}


@pytest.mark.parametrize("page", [p for p in pages() if page_id(p) not in OWN_TEST], ids=page_id)
def test_every_block_of_the_page_runs_as_copied(page, tmp_path, monkeypatch):
    if not any(b.language in RUN for b in blocks(page.read_text(encoding="utf-8"))):
        pytest.skip("no python or bash blocks")
    run_page(page, tmp_path / "work", monkeypatch)


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_fence_names_a_language_the_executor_knows(page):
    text = page.read_text(encoding="utf-8")
    unknown = [
        f"line {b.line}: {b.language!r}" for b in blocks(text) if b.language not in RUN + NOT_RUN
    ]
    assert not unknown, f"fence each block as one of {RUN + NOT_RUN}: {unknown}"
    indented = [n + 1 for n, line in enumerate(text.splitlines()) if re.match(r"\s+```", line)]
    assert not indented, f"indented fences (never run) at lines {indented}"


def test_executor_finds_blocks_in_order_with_their_line_numbers():
    text = "intro\n```python\nx = 1\n```\n\n```bash\necho $HOME\n```\n```text\nout\n```\n"
    assert blocks(text) == [
        Block("python", "x = 1\n", 3),
        Block("bash", "echo $HOME\n", 7),
        Block("text", "out\n", 10),
    ]


def test_a_python_block_gets_no_names_it_did_not_make(tmp_path):
    """Nothing is injected: a name no earlier block of the page defined fails the block."""
    namespace: dict = {"__name__": "__main__"}
    with pytest.raises(pytest.fail.Exception, match="NameError"):
        run_block(Block("python", "trainer.train(prompts)\n", 1), "t", namespace, {}, tmp_path)
    run_block(Block("python", "prompts = [1]\n", 1), "t", namespace, {}, tmp_path)
    run_block(Block("python", "assert prompts == [1]\n", 1), "t", namespace, {}, tmp_path)


def test_a_failing_bash_line_fails_its_block(tmp_path):
    """`-euo pipefail`: a failure inside a pipe or before the last line is not hidden."""
    env = {**os.environ}
    for code in ("false | cat\necho fine\n", "false\necho fine\n", "echo $UNSET_NAME_X\n"):
        with pytest.raises(pytest.fail.Exception):
            run_block(Block("bash", code, 1), "t", {}, env, tmp_path)
    run_block(Block("bash", "true | cat\n", 1), "t", {}, env, tmp_path)


# -------------------------------------------------------------- the README as a front door


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def console_commands(text: str) -> list[str]:
    return [b.code.strip() for b in blocks(text) if b.language == "console"]


def install_commands() -> tuple[list[str], list[str]]:
    """The two commands of the README's "Two commands" section, each split on `&&`:
    (main job, tests)."""
    section = readme().split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    found = console_commands(section)
    assert len(found) == 2, f"expected the two install commands, found {found}"
    main, tests = ([part.strip() for part in c.split("&&")] for c in found)
    return main, tests


def ci_commands() -> list[str]:
    """`.ci/run`'s pip and pytest lines, as a reader would type them: no `python3 -m` before
    pip, no quiet flags."""
    commands = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["python3"]:
            words = words[1:]
            if words[:2] == ["-m", "pip"]:
                words = words[1:]
            else:
                words = ["python", *words]
            quiet = ("--quiet", "--disable-pip-version-check")
            commands.append(shlex.join(w for w in words if w not in quiet))
    return commands


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = install_commands()
    assert [shlex.join(shlex.split(part)) for part in tests] == ci_commands()
    assert tests[-1] == "python -m pytest -q"


def test_main_job_is_the_same_install_then_python_train_py(tmp_path):
    """The main command installs what CI installs (without the test extra) and runs
    `python train.py`; run here as written, stopped by its documented `--num-steps`."""
    main, tests = install_commands()
    assert main[:-1] == [tests[0], tests[1].replace('-e ".[test]"', "-e .")]
    assert main[-1] == "python train.py"
    assert "--num-steps" in readme()  # the step limit is documented next to the command
    env = workspace(tmp_path / "work")
    done = subprocess.run(
        [*shlex.split(main[-1]), "--num-steps", "2"],
        cwd=tmp_path / "work",
        env=env,
        capture_output=True,
        text=True,
        timeout=BASH_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "corpus.txt.gz" in done.stdout  # the embedded corpus, as the README says
    assert (tmp_path / "work" / "checkpoints" / "pretrain" / "latest").is_file()


def test_readme_is_short_and_the_tour_is_on_the_first_screen():
    lines = readme().splitlines()
    assert len(lines) <= 250
    first_python = next(b.line for b in blocks(readme()) if b.language == "python")
    assert first_python <= 60, f"the first python block starts at line {first_python}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_relative_links_point_at_files_in_the_tree(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path = (page.parent / target).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page_id(page)} links to missing files: {missing}"


def test_readme_links_every_docs_page():
    linked = set(LINK.findall(readme()))
    pages_here = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages_here <= linked, f"not linked from the README: {sorted(pages_here - linked)}"


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_prose_names_no_internal_issue_numbers(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found = re.findall(r"(?:issue|PR|pull request)?\s?#\d+\b", text, flags=re.IGNORECASE)
    assert not found, f"{page_id(page)}: {found}"


# ------------------------------------------------------------------- docs/layout.md's tree

NAME = re.compile(r"^[\w.]+(?:\.py|/)$")


def layout_tree(text: str) -> set[str]:
    """Paths named by the first ```text tree of docs/layout.md: a line's leading names (`x.py`
    or `dir/`, two spaces apart) live in the folder its indentation puts them in; other lines
    continue a description."""
    tree = next(b.code for b in blocks(text) if b.language == "text")
    named, folders = set(), []  # folders: (indent, name) from the root down
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip())
        words = re.split(r"\s{2,}", line.strip())
        leading = []
        for word in words:
            if not NAME.match(word):
                break
            leading.append(word)
        if not leading:
            continue
        folders = [(i, f) for i, f in folders if i < indent]
        prefix = "".join(f for _, f in folders)
        named.update(prefix + name for name in leading)
        if leading[-1].endswith("/"):
            folders.append((indent, leading[-1]))
    return named


def test_layout_tree_parser_follows_indentation():
    tree = "```text\npkg/\n  a.py  b.py   what\n  sub/     about\n    c.py   x.py is named\n"
    tree += "           continued, y.py\n  d.py\n```\n"
    assert layout_tree(tree) == {
        "pkg/",
        "pkg/a.py",
        "pkg/b.py",
        "pkg/sub/",
        "pkg/sub/c.py",
        "pkg/d.py",
    }


def test_layout_names_every_module_and_nothing_else():
    named = layout_tree((REPO / "docs" / "layout.md").read_text(encoding="utf-8"))
    package = REPO / "palm_rlhf"
    on_disk = {f"palm_rlhf/{p.relative_to(package)}" for p in package.rglob("*.py")}
    on_disk |= {f"palm_rlhf/{p.relative_to(package)}/" for p in package.rglob("*") if p.is_dir()}
    on_disk = {p for p in on_disk if "__pycache__" not in p} | {"palm_rlhf/"}
    on_disk -= {p for p in on_disk if p.endswith("/__init__.py") and p != "palm_rlhf/__init__.py"}
    assert not on_disk - named, f"docs/layout.md does not name {sorted(on_disk - named)}"
    assert not named - on_disk, f"docs/layout.md names what is not there: {sorted(named - on_disk)}"


# ------------------------------------------------------------------------ docs/results.md


def results_page():
    return importlib.import_module("benchmarks.results_page")


def test_results_page_is_what_the_script_renders_from_the_json_in_the_tree():
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    assert page == results_page().render(), "run: python benchmarks/results_page.py"


def test_every_results_table_says_where_it_was_measured():
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    sections = page.split("\n## ")[1:]
    assert sections and all("Measured at commit" in s for s in sections)


def test_provenance_line_for_new_legacy_and_unrecorded_json():
    line = results_page().provenance_line
    machine = {"cpu": "CPU X", "cores": 4, "avx512": True, "avx512_bf16": False}
    machine |= {"amx_bf16": True, "torch": "2.13.0", "threads": 2}
    new = {"commit": "abc1234", "dirty": True, "date": "2026-12-03T08:00:00+00:00"}
    assert line({"provenance": {**new, "machine": machine}}) == (
        "Measured at commit `abc1234` with uncommitted changes on 2026-12-03: CPU X, 4 cores "
        "(avx512, amx_bf16), 2 threads, torch 2.13.0."
    )
    clean = {**new, "dirty": False, "machine": {**machine, "avx512": False, "amx_bf16": False}}
    assert line({"provenance": clean}).startswith(
        "Measured at commit `abc1234` on 2026-12-03: CPU X, 4 cores (no AVX-512),"
    )
    legacy = {"ours_commit": "e8f3edc", "date": "2026-11-22T01:07:52+00:00", "cpu": "AMD EPYC"}
    legacy |= {"logical_cpus": 2, "threads": 2, "torch": "2.13.0+cpu"}
    assert line({"machine": legacy}) == (
        "Measured at commit `e8f3edc` (clean or not: not recorded) on 2026-11-22: AMD EPYC, "
        "2 cores (CPU flags not recorded), 2 threads, torch 2.13.0+cpu."
    )
    assert (
        line({"machine": "x86_64"}) == "Measured at commit unknown, date unknown; machine: x86_64."
    )
    assert line({}) == "Measured at commit unknown, date unknown; machine: not recorded."


def test_results_page_refuses_a_results_json_it_has_no_section_for(tmp_path):
    (tmp_path / "new-benchmark.json").write_text("{}")
    (tmp_path / "palm-quick.json").write_text("{}")  # smoke runs are left out
    with pytest.raises(SystemExit, match="no section for new-benchmark.json"):
        results_page().render(tmp_path)


def test_provenance_records_this_checkout_and_machine():
    record = importlib.import_module("benchmarks.provenance").provenance(threads=3)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert record["commit"] == head and isinstance(record["dirty"], bool)
    assert record["machine"]["threads"] == 3 and record["machine"]["cores"] >= 1
    assert {"cpu", "avx512", "avx512_bf16", "amx_bf16", "torch"} <= set(record["machine"])
