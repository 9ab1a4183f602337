"""Every shell command in README.md and docs/*.md runs as written, as far as can be told without running it.

For each ```bash block, line continuations are joined, comments dropped, commands split at `&&`, `||`, `|` and `;`,
and leading `NAME=value` assignments skipped. A command `python X.py ...` (also `python3`, `$PY`, `$PYTHON`, or
`torchrun [options] [--] X.py ...`) must name a script that exists, and its CLI must accept the arguments: click
scripts are imported and their command (or group and subcommand) builds a context from the arguments (the same
parse as the command line: unknown options, missing required ones, bad choices and types are refused); argparse
scripts are imported, the parser their main() builds is captured before it parses anything, and it parses the
arguments. Nothing is run. Under torchrun, torchrun's own parser must hand the script and its arguments over intact
(it takes an option prefix such as `--num` for its `--numa-binding` unless `--` precedes the script). `bash X.sh`
needs X.sh to exist. Other commands (pip, conda, `python -m ...`) are not checked.

Every input path (the options in INPUT_OPTIONS, and positional arguments that contain a `/`) must be
  - user data: USER_DATA_PREFIX below (README.md's source says so in a comment), or a URL; or
  - created by an earlier command of the same file: equal to, or under, a value of an output option (OUTPUT_OPTIONS)
    or the `${OUT:-DEFAULT}` folder of a `bash X.sh` script. A glob (`runs/msm/0*`) counts by its part before the
    first wildcard. A value NAME=PATH or PATH=LABEL is checked by its parts that contain a `/`.
"""

import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex

import click
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The one convention for data a reader brings: a path under their home folder.
USER_DATA_PREFIX = "~/"

# Options whose value a command reads (a dataset, a snapshot or run directory, saved measurements, statistics...).
INPUT_OPTIONS = {"--source", "--data", "--val-data", "--test-data", "--network", "--snapshot", "--measurements",
                 "--test-measurements", "--images", "--ref", "--classifier", "--resume", "--transfer", "--maps",
                 "--bridge-source", "--detector", "--run", "--checkpoint", "--input"}
# Options whose value a command writes (a file or a folder), so later commands may read it or anything under it.
OUTPUT_OPTIONS = {"--dest", "--outdir", "--out", "--save-measurements"}

PYTHON_NAMES = {"python", "python3", "$PY", "$PYTHON", "${PY}", "${PYTHON}"}
SEPARATORS = {"&&", "||", "|", ";", "&"}


# ----------------------------------------------------------------------------
# Extraction.


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", markdown, flags=re.M | re.S)


def commands_of(block: str) -> list[list[str]]:
    """The simple commands of a shell block, as token lists (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", block)
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current = []
        for token in lexer:
            if token in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def split_assignments(tokens: list[str]) -> tuple[dict, list[str]]:
    """Leading `NAME=value` words (the command's environment) and the command itself."""
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        name, value = tokens[0].split("=", 1)
        env[name], tokens = value, tokens[1:]
    return env, tokens


# ----------------------------------------------------------------------------
# The CLIs.

_modules = {}


def load_script(rel: str):
    if rel not in _modules:
        path = os.path.join(ROOT, rel)
        if os.path.dirname(rel) == "":
            _modules[rel] = importlib.import_module(os.path.splitext(rel)[0])  # the scripts the tests import too
        else:
            name = "docs_script_" + re.sub(r"\W", "_", rel)
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _modules[rel] = module
    return _modules[rel]


def click_root(module):
    """The script's own click command: its group if it defines one, else its only (or `main`) command."""
    own = [v for v in vars(module).values()
           if isinstance(v, click.Command) and getattr(v.callback, "__module__", None) == module.__name__]
    groups = [c for c in own if isinstance(c, click.Group)]
    if groups:
        return groups[0]
    if len(own) == 1:
        return own[0]
    return vars(module).get("main") if isinstance(vars(module).get("main"), click.Command) else None


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def argparse_parser(module) -> argparse.ArgumentParser:
    """The parser the script's main() builds, taken when main() asks it to parse (so nothing else runs)."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        module.main()
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module.__file__}: main() built no argparse parser")


def parse_script(rel: str, args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Parse `args` with the CLI of script `rel` -> (errors, input values, output values)."""
    module = load_script(rel)
    root = click_root(module)
    inputs, outputs = [], []
    if root is not None:
        command, name, rest = root, rel, list(args)
        if isinstance(root, click.Group):
            if not rest or rest[0].startswith("-"):
                return [f"{rel}: a subcommand is needed ({', '.join(sorted(root.commands))})"], [], []
            sub = root.commands.get(rest[0])
            if sub is None:
                return [f"{rel}: no subcommand {rest[0]!r} ({', '.join(sorted(root.commands))})"], [], []
            command, name, rest = sub, f"{rel} {rest[0]}", rest[1:]
        try:
            ctx = command.make_context(name, rest)
        except click.ClickException as e:
            return [f"{name}: {e.format_message()}"], [], []
        for param in command.params:
            value = ctx.params.get(param.name)
            values = [] if value is None else [str(v) for v in (value if isinstance(value, tuple) else (value,))]
            options = set(getattr(param, "opts", []))
            if isinstance(param, click.Argument):
                inputs += [v for v in values if "/" in v]
            elif options & INPUT_OPTIONS:
                inputs += values
            elif options & OUTPUT_OPTIONS:
                outputs += values
        return [], inputs, outputs
    parser = argparse_parser(module)
    messages = []

    def error(message):
        messages.append(message)
        raise _Captured(parser)

    parser.error = error
    try:
        namespace = parser.parse_args(args)
    except _Captured:
        return [f"{rel}: {messages[-1]}"], [], []
    for action in parser._actions:
        value = getattr(namespace, action.dest, None)
        values = [] if value is None else [str(v) for v in (value if isinstance(value, list) else [value])]
        if not action.option_strings:
            inputs += [v for v in values if "/" in v]
        elif set(action.option_strings) & INPUT_OPTIONS:
            inputs += values
        elif set(action.option_strings) & OUTPUT_OPTIONS:
            outputs += values
    return [], inputs, outputs


def torchrun_split(tokens: list[str]) -> tuple[list[str], str | None]:
    """torchrun's own parse of its arguments -> (errors, the script it would run); its arguments must reach it."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    messages = []

    def error(message):
        messages.append(message)
        raise _Captured(parser)

    parser.error = error
    # A shell variable ($NODE_RANK) stands for a value the reader's shell supplies; torchrun checks its type.
    tokens = [re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "0", t) for t in tokens]
    try:
        parsed = parser.parse_args(tokens)
    except _Captured:
        hint = " (put `--` before the script name)" if "ambiguous option" in messages[-1] else ""
        return [f"torchrun: {messages[-1]}{hint}"], None
    script_at = tokens.index(parsed.training_script)
    if parsed.training_script_args != tokens[script_at + 1:]:
        return [f"torchrun takes part of {parsed.training_script}'s arguments (put `--` before the script name)"], None
    return [], parsed.training_script


# ----------------------------------------------------------------------------
# Paths.


def _normal(path: str) -> str:
    return os.path.normpath(path.rstrip("/"))


def _created(path: str, outputs: list[str]) -> bool:
    wild = re.search(r"[*?\[]", path)
    if wild:
        stem = path[: wild.start()]
        path = stem.rstrip("/") if stem.endswith("/") else os.path.dirname(stem)
    path = _normal(path)
    return any(path == _normal(o) or path.startswith(_normal(o) + os.sep) for o in outputs)


def input_problems(value: str, outputs: list[str]) -> list[str]:
    parts = [p for p in value.split("=") if "/" in p] or [value]
    problems = []
    for part in parts:
        if part.startswith(USER_DATA_PREFIX) or "://" in part:
            continue
        if "$" in part:
            problems.append(f"input {part} depends on a shell variable")
        elif not _created(part, outputs):
            problems.append(f"input {part} is never created by an earlier command (nor is it user data under "
                            f"{USER_DATA_PREFIX})")
    return problems


def shell_script_outputs(rel: str) -> list[str]:
    """The folder a shell script writes: its `${OUT:-DEFAULT}` (a default built from other variables is unknown)."""
    with open(os.path.join(ROOT, rel)) as f:
        return [d for d in re.findall(r"\$\{OUT:-([^}]+)\}", f.read()) if "$" not in d]


# ----------------------------------------------------------------------------
# One document.


def check_markdown(markdown: str) -> list[str]:
    """Problems with the commands of one Markdown document, each naming the command."""
    problems, outputs = [], []
    for block in shell_blocks(markdown):
        for tokens in commands_of(block):
            env, tokens = split_assignments(tokens)
            if not tokens:
                continue
            shown = " ".join(tokens)[:100]
            found = []
            if tokens[0] == "torchrun":
                found, script = torchrun_split(tokens[1:])
                if script is None:
                    problems += [f"{shown}: {p}" for p in found]
                    continue
                args = tokens[tokens.index(script, 1) + 1:]
            elif tokens[0] in PYTHON_NAMES and len(tokens) > 1 and tokens[1].endswith(".py"):
                script, args = tokens[1], tokens[2:]
            elif tokens[0] == "bash" and len(tokens) > 1 and tokens[1].endswith(".sh"):
                if not os.path.isfile(os.path.join(ROOT, tokens[1])):
                    problems.append(f"{shown}: no script {tokens[1]}")
                else:
                    outputs += [env["OUT"]] if "OUT" in env else shell_script_outputs(tokens[1])
                continue
            else:
                continue  # pip, conda, python -m ...: not this test's business
            if not os.path.isfile(os.path.join(ROOT, script)):
                problems.append(f"{shown}: no script {script}")
                continue
            errors, inputs, written = parse_script(script, args)
            problems += [f"{shown}: {e}" for e in errors]
            for value in inputs:
                problems += [f"{shown}: {p}" for p in input_problems(value, outputs)]
            outputs += written
    return problems


DOCUMENTS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_commands_run_as_written(document):
    with open(os.path.join(ROOT, document), encoding="utf-8") as f:
        markdown = f.read()
    assert shell_blocks(markdown) or document != "README.md", "README.md has no ```bash block"
    problems = check_markdown(markdown)
    assert not problems, f"{document}:\n" + "\n".join(problems)


def test_readme_states_the_user_data_convention():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert f"user data: paths under {USER_DATA_PREFIX}" in f.read()


# ----------------------------------------------------------------------------
# The checker refuses what it should (small inline documents).


def _doc(*lines: str) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```\n"


MAKE_DATA = "python dataset_tool.py phantoms --dest datasets/p.zip --num 8 --resolution 16"


def test_a_correct_document_passes():
    doc = _doc(MAKE_DATA,
               "# a comment, then a continued command with a variable prefix",
               "OMP_NUM_THREADS=1 python train.py --outdir runs/a --data datasets/p.zip --batch 8 \\",
               "    --duration 0.001  # trailing comment",
               "python generate.py --network runs/a/0* --outdir out/s --seeds 0-3",
               "python fid.py calc --images ~/my-images --ref https://example.org/ref.npz --num 2 | tee out.txt",
               "torchrun --standalone --nproc_per_node=2 -- fid.py calc --images out/s --ref ~/ref.npz --num 4",
               "python bench/recon_table.py out/s=samples")
    assert check_markdown(doc) == []


@pytest.mark.parametrize("line, expected", [
    ("python train.py --outdir runs --data datasets/p.zip --batchsize 8", "No such option '--batchsize'"),
    ("python dataset_tool.py phantom --dest datasets/q.zip", "no subcommand 'phantom'"),
    ("python dataset_tool.py --dest datasets/q.zip", "a subcommand is needed"),
    ("python no_such_script.py --outdir out", "no script no_such_script.py"),
    ("bash no_such_script.sh", "no script no_such_script.sh"),
    ("python generate.py --network runs/never-trained --outdir out/s", "input runs/never-trained is never created"),
    ("python bench/recon_table.py out/never=label", "input out/never is never created"),
    ("python bench/recon_table.py --no-such-flag out/x", "unrecognized arguments"),
    ("python train.py --outdir runs --data datasets/p.zip --precision fp8", "fp8"),
    ("torchrun --standalone --nproc_per_node=2 fid.py calc --images ~/i --ref ~/r.npz --num 4", "torchrun"),
    ("python generate.py --network $RUN --outdir out/s", "shell variable"),
])
def test_a_broken_command_is_refused(line, expected):
    problems = check_markdown(_doc(MAKE_DATA, line))
    assert any(expected in p for p in problems), problems


def test_an_input_created_only_later_or_in_another_file_is_refused():
    later = _doc("python train.py --outdir runs/a --data datasets/p.zip", MAKE_DATA)
    assert any("datasets/p.zip is never created" in p for p in check_markdown(later))
    assert check_markdown(_doc(MAKE_DATA)) == []


def test_shell_script_outputs_count_as_created():
    doc = _doc("bash quickstart.sh", "python reconstruct.py --network out/quickstart/runs/00000-x "
               "--measurements out/quickstart/measurements-r4 --outdir out/r --methods msm")
    assert check_markdown(doc) == []
    given = _doc("OUT=out/ct bash bench/posterior_family.sh ct", "python bench/recon_table.py out/ct/first=oracle")
    assert check_markdown(given) == []
    unknown = _doc("bash bench/posterior_family.sh ct", "python bench/recon_table.py out/ct/first=oracle")
    assert any("out/ct/first is never created" in p for p in check_markdown(unknown))


def test_every_script_has_a_cli_the_checker_reads():
    """A script added later (a converter, a benchmark) is read the same way: a click command or group, or an
    argparse parser built in main()."""
    scripts = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")))
    for path in scripts:
        module = load_script(os.path.relpath(path, ROOT))
        assert click_root(module) is not None or isinstance(argparse_parser(module), argparse.ArgumentParser), path
