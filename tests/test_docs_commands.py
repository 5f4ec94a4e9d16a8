"""The commands the docs quote still work: README.md, docs/*.md, the recipes' own docstrings and the comments of
the config files (accelerate_configs/, recipes/configs/). Every repo path they name exists, every test they cite
exists, and every script a quoted command runs answers `--help` listing each option the docs pass it. The scripts
run once each, inside one child process (torch and TRL are imported once, not per script)."""

import ast
import json
import re
import subprocess
import sys

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REPO_PATH = re.compile(r"(?<![\w./-])((?:recipes|src|accelerate_configs|ds_configs|data|benchmarks|scripts|tests|docs|"
                       r"notes|\.ci)/"
                       r"[\w./-]*[\w/])")
SCRIPT = re.compile(r"(?<![\w./-])((?:recipes|benchmarks)/\w+\.py)\b")
CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)


def recipe_docstrings() -> dict[str, str]:
    return {f"recipes/{path.name}": ast.get_docstring(ast.parse(path.read_text())) or ""
            for path in sorted((REPO / "recipes").glob("*.py"))}


CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml")) + sorted((REPO / "recipes" / "configs").glob("*/*.yaml"))


def config_comments() -> dict[str, str]:
    """The comments of every config file, by its repo path: what they cite is checked like the docs."""
    return {str(path.relative_to(REPO)): "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines()
                                                 if "#" in line)
            for path in CONFIGS}


def quoted_commands() -> list[tuple[str, str]]:
    """(where, command line) of every quoted line that runs a repo script, continuation lines joined."""
    texts = {path.name: "\n".join(a or b for a, b in CODE.findall(path.read_text())) for path in DOCS}
    texts.update(recipe_docstrings())
    texts.update(config_comments())
    commands = []
    for where, text in texts.items():
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()  # without its comment
            if SCRIPT.search(line):
                commands.append((where, line))
    return commands


def test_every_named_repo_path_exists():
    texts = {path.name: path.read_text() for path in DOCS} | recipe_docstrings() | config_comments()
    missing = [f"{where}: {name}" for where, text in texts.items() for name in REPO_PATH.findall(text)
               if not (REPO / name.rstrip(".")).exists()]
    # chatgpt_recipes/X.py alone (docs name shared modules that way) is src/chatgpt_recipes/X.py
    missing += [f"{where}: {name}" for where, text in texts.items()
                for name in re.findall(r"(?<![\w/])chatgpt_recipes/\w+\.py", text) if not (REPO / "src" / name).exists()]
    assert not missing, "the docs name files that do not exist:\n" + "\n".join(missing)


def test_every_cited_test_exists():
    """A statement about behaviour that names the test proving it (`test_x`, or tests/test_file.py::test_x) names a
    test that is there."""
    texts = {path.name: path.read_text() for path in DOCS} | recipe_docstrings() | config_comments()
    defined = {name for path in (REPO / "tests").rglob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    missing = [f"{where}: {name}" for where, text in texts.items()
               for name in re.findall(r"(?<![\w/])(test_\w+)(?![\w.])", text) if name not in defined]
    missing += [f"{where}: {file}::{name}" for where, text in texts.items()
                for file, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", text)
                if not (REPO / file).is_file() or f"def {name}(" not in (REPO / file).read_text()]
    assert not missing, "the docs cite tests that do not exist:\n" + "\n".join(missing)


HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    sys.argv, sys.path[0], text = [script, "--help"], script.rsplit("/", 1)[0], io.StringIO()
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            runpy.run_path(script, run_name="__main__")
        code = "returned without printing its help"
    except SystemExit as error:
        code = error.code
    except Exception as error:
        code = repr(error)
    out[script] = {"code": code, "help": text.getvalue()}
print("HELP_RESULTS" + json.dumps(out))
"""


def takes_arguments(script: str) -> bool:
    """Scripts without an argument parser (a few benchmarks) would run in full on `--help`: only their path is
    checked."""
    source = (REPO / script).read_text()
    return "argparse" in source or "run(main" in source


def test_quoted_commands_answer_help_with_their_options():
    commands = quoted_commands()
    scripts = sorted({SCRIPT.search(line).group(1) for _, line in commands})
    assert "recipes/sft_lora.py" in scripts and len(scripts) > 10  # the extraction found the commands
    runnable = [script for script in scripts if takes_arguments(script)]
    result = subprocess.run([sys.executable, "-c", HELP_RUNNER, *runnable], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert "HELP_RESULTS" in result.stdout, result.stderr[-3000:]
    helps = json.loads(result.stdout.split("HELP_RESULTS", 1)[1])
    broken = [f"{script}: --help exited with {run['code']!r}:\n{run['help'][-1500:]}"
              for script, run in helps.items() if run["code"] != 0 or "usage:" not in run["help"]]
    assert not broken, "\n\n".join(broken)

    unknown = []
    for where, line in commands:
        script = SCRIPT.search(line).group(1)
        if script in helps:
            options = set(re.findall(r"--[\w-]+", helps[script]["help"]))
            if re.search(r'run\(main, .*\.yaml"\)|^OPTIONS, DEFAULT_CONFIG = .*\.yaml"$', (REPO / script).read_text(),
                         flags=re.M):
                options.add("--config")  # read by chatgpt_recipes.cli.parse_config before argparse, so not in --help
            passed = re.findall(r"(?<![\w-])--\w+", line.split(script, 1)[1])
            unknown += [f"{where}: {option} in `{line}`" for option in passed if option not in options]
    assert not unknown, "quoted commands pass options their script does not have:\n" + "\n".join(unknown)

