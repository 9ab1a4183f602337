"""EasyDict, the error type for bad user input, checks of stored configs and output folders, atomic writes,
downloads."""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import urllib.parse
import urllib.request


class EasyDict(dict):
    """A dict whose keys are also attributes (`d.lr` == `d['lr']`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


class UserError(Exception):
    """Bad input from the user: the scripts print the message (one sentence) and exit non-zero, without traceback."""


def _temp_name(path: str) -> str:
    """The temporary name of an output being written: beside `path` (same folder, so the rename is atomic), marked by
    the writing process (a stale one names the process that was killed)."""
    return f"{path}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Write a file atomically: yields a file open in `mode` under a temporary name in path's folder; when the block
    ends cleanly the file is flushed, fsync'd and renamed onto `path` (replacing any old file in one step); on any
    exception it is removed. So `path` holds either its old content or the whole new one, never a torn file, even if
    the process is killed (then only the `<path>.tmp-<pid>` file is left behind, never under the final name)."""
    tmp = _temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str):
    """`atomic_write` for an output that is a folder of files (a dataset of records): yields a fresh temporary folder
    beside `path`, renamed onto `path` when the block ends cleanly and removed with everything in it on any
    exception. `path` must not exist (a folder cannot replace a non-empty one in one step): check that first."""
    tmp = _temp_name(os.path.abspath(path))
    os.makedirs(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AtomicWriter:
    """Base of the writers that build an output piece by piece (datasets): a subclass opens its output with
    `self.stage(atomic_write(...))` or `self.stage(atomic_folder(...))`, adds to it, and ends `finish()` with
    `self.commit()`, which renames it into place. Used as a context manager: leaving the `with` block by an
    exception, or without `finish()`, removes the temporary output, so rejected input leaves nothing behind."""

    def __init__(self):
        self._staged = contextlib.ExitStack()
        self._committed = False

    def stage(self, output):
        """Enter the atomic context manager `output` (kept open until `commit`) -> what it yields."""
        return self._staged.enter_context(output)

    def commit(self):
        """End the staged output cleanly: it is renamed onto its final name."""
        self._staged.close()
        self._committed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and not self._committed:
            exc = RuntimeError(f"{type(self).__name__} was left without finish(); its output is discarded.")
            self._staged.__exit__(RuntimeError, exc, None)
            raise exc
        if exc_type is not None:
            self._staged.__exit__(exc_type, exc, tb)  # the staged output removes itself
        return False


class ConfigError(UserError):
    """A value of a stored config (snapshot, training state, dataset index) that is not allowed: `field` is its
    dotted place in the config ('network.kwargs.model_channels'), `problem` says what was expected. Loaders catch it
    and name the file in one sentence."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field} {problem}")
        self.field, self.problem = field, problem


@dataclasses.dataclass(frozen=True)
class Field:
    """One value a stored config may hold: its JSON kind and the values allowed. Stored configs are validated against
    tables of Fields before anything is built from them, so a file can only choose among values this code expects.

    kind: 'int', 'float' (finite; ints accepted), 'bool', 'str', 'ints' (list of ints), 'json' (any JSON value,
    recorded for people and never interpreted by code). low / high bound numbers and list items (inclusive);
    choices lists the allowed strings; max_items bounds lists; optional allows None; required refuses absence.
    """

    kind: str
    low: float = -math.inf
    high: float = math.inf
    choices: tuple = ()
    max_items: int = 16
    optional: bool = False
    required: bool = False

    def _number_problem(self, value, integer: bool) -> str | None:
        wanted = "an integer" if integer else "a finite number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return f"must be {wanted}"
        if (isinstance(value, float) and not math.isfinite(value)) or not self.low <= value <= self.high:
            return f"must be {wanted} in [{self.low:g}, {self.high:g}]"
        return None

    def problem(self, value) -> str | None:
        """None when `value` is allowed, else what was expected (a sentence fragment)."""
        if value is None:
            return None if self.optional else "must not be null"
        if self.kind in ("int", "float"):
            return self._number_problem(value, self.kind == "int")
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "str":
            if not isinstance(value, str):
                return "must be a string"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}"
            return None
        if self.kind == "ints":
            if (not isinstance(value, list) or len(value) > self.max_items
                    or any(self._number_problem(v, True) for v in value)):
                return f"must be a list of at most {self.max_items} integers in [{self.low:g}, {self.high:g}]"
            return None
        if self.kind == "json":
            return None
        raise ValueError(f"unknown Field kind {self.kind!r}")


def check_fields(values, fields: dict, where: str) -> dict:
    """Refuse (ConfigError) a config dict `values` at dotted place `where` unless it is a dict whose keys are all in
    `fields` and whose values each pass their Field; returns `values`."""
    if not isinstance(values, dict):
        raise ConfigError(where, f"must be a JSON object, got {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"is not a known field (expected some of {', '.join(fields)})")
    for name, field in fields.items():
        if name not in values:
            if field.required:
                raise ConfigError(f"{where}.{name}", "is missing")
            continue
        problem = field.problem(values[name])
        if problem:
            raise ConfigError(f"{where}.{name}", f"{problem}, got {values[name]!r:.60}")
    return values


def check_outdir(path: str, option: str = "--outdir"):
    """Refuse an output folder that cannot be made or written, before anything is written: it must be a directory
    or not exist yet, and its nearest existing ancestor must be a writable directory. Creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} exists and is not a directory.")
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"{option} {path} cannot be created: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} cannot be written: {ancestor} is not writable.")


SETTINGS_FILE = "settings.json"


def _settings_problem(outdir: str, settings: dict) -> str | None:
    path = os.path.join(outdir, SETTINGS_FILE)
    if not os.path.lexists(path):
        if os.path.isdir(outdir) and os.listdir(outdir):
            return f"already holds files but no {SETTINGS_FILE}, so they may be another run's results"
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return f"holds a {SETTINGS_FILE} that cannot be read as JSON ({type(e).__name__})"
    new = json.loads(json.dumps(settings))
    if not isinstance(old, dict):
        return f"holds a {SETTINGS_FILE} that is not a JSON object"
    # Settings both runs name first (an option's value changed), then those only one of them has.
    differing = sorted((k not in old or k not in new, k) for k in set(old) | set(new) if old.get(k) != new.get(k))
    differing = [k for _, k in differing]
    if differing:
        more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
        return f"holds the results of a run with other settings ({', '.join(differing[:3])}{more} differ)"
    return None


def check_outdir_settings(outdir: str, settings: dict, option: str = "--outdir"):
    """Refuse, before anything is written, an output folder that holds another run's results: one whose
    `settings.json` (written by `write_outdir_settings`) records other settings, or that holds files but no record.
    A rerun with the same settings may overwrite its own outputs; no folder ever mixes the results of two runs."""
    problem = _settings_problem(outdir, settings)
    if problem:
        raise UserError(f"{option} {outdir} {problem}; give a new {option}.")


def write_outdir_settings(outdir: str, settings: dict, option: str = "--outdir"):
    """Create outdir and record `settings` in its settings.json (temp file + rename), before any output is written."""
    path = os.path.join(outdir, SETTINGS_FILE)
    try:
        os.makedirs(outdir, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(settings, f, indent=2, sort_keys=True)
    except OSError as e:  # e.g. under /proc, which os.access calls writable
        raise UserError(f"{option} {outdir} cannot be written: {e.strerror or e}.") from e


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks (records of where a model or statistic came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> str:
    """Where downloads are kept: `$MSM_CACHE_DIR`, else `~/.cache/msm`."""
    return os.environ.get("MSM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "msm")


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def open_url(url_or_path: str, cache_dir: str | None = None, timeout_s: float = 60) -> str:
    """A local path for `url_or_path`: a local path is returned unchanged; a URL is downloaded once into the cache.

    The cached file is named after the URL's last path component, so a user without network can download the file by
    other means and put it there by hand (`{cache_dir}/{basename}`). Downloads go to a temporary file that is renamed
    when complete, so an interrupted download never leaves a truncated file under the final name. Network failures
    raise OSError (urllib's URLError is one); callers turn that into a message about how to provide the file.
    """
    if not is_url(url_or_path):
        if not os.path.isfile(url_or_path):
            raise FileNotFoundError(f"{url_or_path} is not a file")
        return url_or_path
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    basename = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url_or_path).path)) or "download"
    cached = os.path.join(directory, basename)
    if os.path.isfile(cached):
        return cached
    created = os.path.abspath(directory)  # the outermost folder this call creates, removed again on failure
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    try:
        with urllib.request.urlopen(url_or_path, timeout=timeout_s) as response:
            os.makedirs(directory, exist_ok=True)  # only once the server answers: offline, nothing is touched
            with atomic_write(cached) as f:
                shutil.copyfileobj(response, f)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return cached


def user_message(error: UserError) -> str:
    """The one sentence of a UserError. One raised in a data-loader worker reaches the main process re-raised with
    the worker's whole traceback as its message; its last line holds the sentence."""
    message = str(error)
    if "Traceback (most recent call last)" in message:
        last = message.rstrip().splitlines()[-1]
        exception = re.fullmatch(r"[\w.]+: (.*)", last)  # 'dnnlib.util.UserError: <the sentence>'
        message = exception.group(1) if exception else last
    return message


def run_cli(command, args: list | None = None):
    """Run a click command on `args` (default: the command line); bad input (UserError) prints one line on rank 0
    and exits 1 without a traceback."""
    import os
    import sys

    import click

    try:
        command(args=args, standalone_mode=False)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"Error: {user_message(e)}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
