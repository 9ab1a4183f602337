"""EasyDict, construction of objects by name, and the error type for bad user input."""

import abc
import importlib
import os
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


class AtomicWriter(abc.ABC):
    """Base of the writers that build an output under a temporary name and rename it on success: used as a context
    manager, an exception inside the `with` block calls `abort()`, so rejected input leaves nothing behind."""

    @abc.abstractmethod
    def abort(self):
        """Remove the temporary output."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def get_obj_by_name(name: str):
    """'package.module.Name' -> the object. Only used for names this project writes into its own configs."""
    module_name, _, obj_name = name.rpartition(".")
    if not module_name:
        raise ValueError(f"expected a dotted name 'module.Object', got {name!r}")
    return getattr(importlib.import_module(module_name), obj_name)


def construct_class_by_name(*args, class_name: str, **kwargs):
    """Instantiate the class called `class_name` with the remaining arguments."""
    return get_obj_by_name(class_name)(*args, **kwargs)


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
    os.makedirs(directory, exist_ok=True)
    tmp = f"{cached}.tmp-{os.getpid()}"
    try:
        with urllib.request.urlopen(url_or_path, timeout=timeout_s) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return cached


def run_cli(command):
    """Run a click command; bad input (UserError) prints one line on rank 0 and exits 1 without a traceback."""
    import os
    import sys

    import click

    try:
        command(standalone_mode=False)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
