"""Reading torch's zip archives (torch.save files and TorchScript modules) without running anything from them and
without allocating more than their index declares.

A torch zip archive is `<prefix>/data.pkl` (a pickle of the saved object whose tensors refer to storages by key),
`<prefix>/data/<key>` (the raw bytes of each storage) and small bookkeeping files; a TorchScript archive adds its
Python source under `<prefix>/code/` and `constants.pkl`. `read_index` reads only the central directory and data.pkl,
with an unpickler that knows a fixed handful of names (tensor rebuilding, storage types, OrderedDict, TorchScript's
list builders) and refuses any other global, so it calls nothing a file chooses and loads no storage: tensors come
back as `TensorEntry` (shape, dtype, bytes). Callers check names, shapes and sizes against what they expect, and only
then read data: `load_tensors` (TorchScript weights, whose code is never run) or `torch.load(weights_only=True)`.

Member sizes are the uncompressed sizes of the zip's central directory, which Python's zipfile and torch's reader both
use to size their buffers, so a deflated "zip bomb" storage is refused from its declared size before it is inflated.
"""

import collections
import dataclasses
import io
import pickle
import zipfile

import torch

from dnnlib import UserError

# data.pkl holds names, configs and tensor headers only (a few MB for the largest networks); a bigger one is not ours.
MAX_PICKLE_BYTES = 64 * 2**20
MAX_MEMBERS = 100_000

# The storage classes torch.save and TorchScript name in data.pkl, and their element types.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
# Bookkeeping members of both formats; TorchScript also keeps its code and debug tables, which are never read.
_TORCH_SAVE_MEMBERS = ("data.pkl", "version", ".format_version", ".storage_alignment", "byteorder",
                       ".data/serialization_id", ".data/version")
_TORCHSCRIPT_FOLDERS = ("code/", "extra/", "constants/")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """A tensor as data.pkl declares it: which storage, where in it, and its shape; no data read."""

    key: str
    dtype: torch.dtype
    offset: int
    shape: tuple
    stride: tuple

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


class ScriptObject:
    """A TorchScript module object of data.pkl (`__torch__.…` class, made by pickle's NEWOBJ without __init__): only
    its attributes are kept, as `state`."""

    class_name = ""
    state: dict = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


@dataclasses.dataclass
class ArchiveIndex:
    path: str
    prefix: str  # the archive's top folder, e.g. 'network-snapshot-000000/'
    root: object  # data.pkl's object, tensors as TensorEntry
    storages: dict  # key -> (dtype, numel)
    is_torchscript: bool

    @property
    def total_bytes(self) -> int:
        return sum(numel * dtype.itemsize for dtype, numel in self.storages.values())


def _identity(value):
    return value


class _IndexUnpickler(pickle.Unpickler):
    """data.pkl -> objects with TensorEntry for tensors; any global outside the fixed table is refused."""

    def __init__(self, data: bytes, members: dict, prefix: str, what: str, torchscript: bool):
        super().__init__(io.BytesIO(data))
        self.members, self.prefix, self.what, self.torchscript = members, prefix, what, torchscript
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                      "build_tensorlist"):
            return _identity
        if self.torchscript and module.startswith("__torch__"):
            return type("ScriptObject", (ScriptObject,), {"class_name": f"{module}.{name}"})
        raise UserError(f"{self.what} refers to {module}.{name}, which a weights file never holds, so it is not read.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise UserError(f"{self.what} has a malformed storage reference {pid!r:.80}.")
        _, dtype, key, _, numel = pid
        member = self.members.get(f"{self.prefix}data/{key}")
        declared = numel * dtype.itemsize
        if member is None or member.file_size != declared:
            found = "no such member" if member is None else f"{member.file_size} bytes"
            raise UserError(f"{self.what} declares a storage {key!r:.40} of {declared} bytes, but the archive "
                            f"holds {found}.")
        self.storages[key] = (dtype, numel)
        return key

    def _rebuild_tensor(self, key, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
        dims = (offset, *shape, *stride) if isinstance(shape, tuple) and isinstance(stride, tuple) else (None,)
        if not all(isinstance(n, int) and n >= 0 for n in dims) or len(shape) != len(stride) or hooks:
            raise UserError(f"{self.what} declares a malformed tensor (shape {shape!r:.60}).")
        dtype, numel = self.storages[key]
        extent = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
        if 0 not in shape and extent > numel:
            raise UserError(f"{self.what} declares a tensor of shape {tuple(shape)} beyond its storage of {numel} "
                            "elements.")
        return TensorEntry(key, dtype, offset, tuple(shape), tuple(stride))


def _member_names_problem(names: list, prefix: str, torchscript: bool) -> str | None:
    for name in names:
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest is None:
            return f"a member {name!r:.80} outside its folder {prefix}"
        if rest in _TORCH_SAVE_MEMBERS or (rest.startswith("data/") and "/" not in rest[5:]):
            continue
        if torchscript and (rest == "constants.pkl" or rest.startswith(_TORCHSCRIPT_FOLDERS)):
            continue
        return f"an unexpected member {name!r:.80}"
    return None


def read_index(path: str, what: str, torchscript: bool = False) -> ArchiveIndex:
    """The structure of the torch zip archive at `path` with tensors as TensorEntry, after checking its member names
    (a TorchScript archive only with `torchscript`), member count, data.pkl's size, every storage's declared size
    and every tensor's extent; refused (UserError naming `what`, e.g. 'Network snapshot PATH') otherwise."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{what} could not be read as a zip archive of torch's format (torch.save or TorchScript).")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not infos or len(infos) > MAX_MEMBERS:
                raise UserError(f"{what} holds {len(infos)} archive members (expected 1 to {MAX_MEMBERS}).")
            prefix = infos[0].filename.split("/")[0] + "/"
            members = {info.filename: info for info in infos}
            pkl = members.get(f"{prefix}data.pkl")
            if pkl is None:
                raise UserError(f"{what} has no {prefix}data.pkl, so it is not a torch archive.")
            is_torchscript = f"{prefix}constants.pkl" in members or any(
                name.startswith(f"{prefix}code/") for name in members)
            if is_torchscript and not torchscript:
                raise UserError(f"{what} is a TorchScript module (it holds code), not a weights file, so it is not "
                                "read.")
            problem = _member_names_problem(list(members), prefix, torchscript)
            if problem:
                raise UserError(f"{what} holds {problem}, which a torch weights archive does not.")
            if pkl.file_size > MAX_PICKLE_BYTES:
                raise UserError(f"{what} has a data.pkl of {pkl.file_size} bytes, more than the "
                                f"{MAX_PICKLE_BYTES >> 20} MiB a weights file needs.")
            byteorder = members.get(f"{prefix}byteorder")
            if byteorder is not None and (byteorder.file_size > 16 or zf.read(byteorder) != b"little"):
                raise UserError(f"{what} stores big-endian tensors; only little-endian archives are read.")
            unpickler = _IndexUnpickler(zf.read(pkl), members, prefix, what, torchscript)
            root = unpickler.load()
    except UserError:
        raise
    except Exception as e:  # zipfile and pickle raise many types for corrupt or crafted files
        raise UserError(f"{what} could not be read as a torch archive ({type(e).__name__}).") from e
    return ArchiveIndex(path, prefix, root, unpickler.storages, is_torchscript)


def tensor_entries(obj) -> dict:
    """{dotted name: TensorEntry} of the tensors in dicts and TorchScript module attributes under obj (a state dict's
    names for a module tree: 'Mixed_5b.branch1x1.conv.weight'). Iterative and visiting each container once, so
    neither a crafted nesting depth nor a container that holds itself (pickle's memo allows both) can stall it."""
    out, stack, seen = {}, [("", obj)], set()
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, TensorEntry):
            out[prefix[:-1]] = value
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        items = value.state.items() if isinstance(value, ScriptObject) else value.items() if isinstance(
            value, dict) else ()
        stack.extend((f"{prefix}{name}.", child) for name, child in items if isinstance(name, str))
    return out


def load_tensors(index: ArchiveIndex, entries: dict) -> dict:
    """{name: TensorEntry} -> {name: tensor}, reading each storage's bytes (sizes checked by `read_index`)."""
    storages = {}
    with zipfile.ZipFile(index.path) as zf:
        for entry in entries.values():
            if entry.key not in storages:
                raw = bytearray(zf.read(f"{index.prefix}data/{entry.key}"))
                data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                storages[entry.key] = data.view(entry.dtype)
    return {name: storages[e.key].as_strided(e.shape, e.stride, e.offset).clone() for name, e in entries.items()}
