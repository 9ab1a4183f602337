"""EDM-format network pickles (NVlabs/edm `network-snapshot-*.pkl`) -> this project's snapshot config and weights,
read without executing anything from the file.

An EDM pickle is `pickle.dump` of a dict whose 'ema' is the network. Every network class of EDM is saved through its
`torch_utils.persistence`: an instance pickles as a call of `_reconstruct_persistent_obj(meta)`, where meta holds the
source text of the class's whole module, the class name and the instance's `__dict__` (its `_parameters`, `_buffers`
and `_modules`, and `_init_kwargs`, the constructor's keyword arguments); loading it the ordinary way executes that
source. Tensors pickle as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (parameters wrapped
in `_rebuild_parameter`), each storage as `torch.storage._load_from_bytes(b)`, b a small legacy `torch.save` file.

`_RestrictedUnpickler` resolves only the globals of `_ALLOWED_GLOBALS`: the persistence hook becomes a stub that
keeps the class name, the state and a sha256 of the embedded source (which is never run), torch's container modules
become inert stand-ins, tensors are rebuilt after their geometry is checked against their storage, and a storage is
read with `torch.load(weights_only=True)` after its declared size is checked against the bytes that hold it (so no
allocation exceeds the file). Any other global is refused, naming it, before it is called.

`convert_edm` then maps the EDM network onto `EDMPrecond` / `VPPrecond` / `VEPrecond` over `SongUNet` /
`DhariwalUNet` (training/networks.py), with EDM's own constructor defaults (they are not stored in the file and some
differ from this project's): the enc / dec module names, the [sin | cos] order SongUNet feeds its noise MLP (EDM
swaps the halves of its [cos | sin] embedding; ours does not; a class-conditional SongUNet adds its label map to
those features, which our SongUNet does with `label_before_mlp`), EDM's (head, channel, q/k/v) row order of the fused
qkv projection (ours is (q/k/v, head, channel)), the persistent resample-filter buffers (checked against the filter
the config implies, then dropped: ours are computed), and map_augment (dropped: it is a bias-free map of the
augmentation labels, which EDM's sampling leaves absent, so dropping it is exact for sampling; a converted network
cannot take augmentation labels). The target network is first built on the meta device, and refused when it needs
more weights than the file holds, so the file's arguments cannot make the converter allocate more than the file.

Refused in one sentence: EDM's iDDPMPrecond (the ADM baseline: learned-variance output and its own noise table),
PaDIS's Patch_EDMPrecond (its file does not record the pad width its position channels refer to, so the canvas
geometry of training/patches.py cannot be rebuilt from it), EDM2's networks, and any module class, constructor
argument or weight that EDM's DDPM++ / NCSN++ / ADM networks do not have (e.g. Ambient Diffusion's gated
convolutions).
"""

import collections
import hashlib
import io
import math
import os
import pickle

import numpy as np
import torch

from dnnlib import ConfigError, UserError
from training import networks
from training import snapshot as checkpoint

_PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of every EDM release
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first record of a legacy (non-zip) torch.save stream
_LEGACY_PROTOCOL = 1001
_MAX_DIMS = 8
_MAX_DEPTH = 64  # module nesting; EDM's networks nest 5 deep

# Constructor defaults of EDM's classes (its training/networks.py): a file stores only the arguments its train.py
# passed, so every other argument takes these values. They differ from this project's in places (EDMPrecond's
# model_type, SongUNet's channel_mult).
_EDM_PRECOND_DEFAULTS = {
    "EDMPrecond": dict(label_dim=0, use_fp16=False, sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5,
                       model_type="DhariwalUNet"),
    "VPPrecond": dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                      model_type="SongUNet"),
    "VEPrecond": dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100.0, model_type="SongUNet"),
}
_EDM_MODEL_DEFAULTS = {
    "SongUNet": dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                     attn_resolutions=[16], dropout=0.10, label_dropout=0.0, embedding_type="positional",
                     channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
    "DhariwalUNet": dict(augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                         num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0.0),
}
_EDM_MODULE_CLASSES = {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
                       "SongUNet", "DhariwalUNet"}
_REFUSED_ROOTS = {
    "iDDPMPrecond": "EDM's ADM baseline with iDDPM preconditioning, whose learned-variance output and discrete noise "
                    "table this project's preconditioners do not have",
    "Patch_EDMPrecond": "a PaDIS / Patch-Diffusion patch prior, whose file does not record the pad width its position "
                        "channels refer to, so the canvas geometry of training/patches.py cannot be rebuilt from it",
    "Precond": "an EDM2 network, whose magnitude-preserving layers this project's networks do not have",
}

# Storage types a legacy torch.save stream may name, with their element sizes.
_STORAGE_TYPES = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                  "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1}
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class _Refused(UserError):
    """What is wrong with the file, as a sentence fragment: `read_edm_pickle` and `convert_edm` add its name."""


# ----------------------------------------------------------------------------------------------------------------------
# The restricted unpickler.


class PersistentStub:
    """What `_reconstruct_persistent_obj(meta)` yields here: the class name, the constructor's keyword arguments, the
    instance state and the sha256 of the module source, which is kept only as text."""

    __slots__ = ("class_name", "init_kwargs", "state", "source_sha256")

    def __setstate__(self, state):  # nothing in an EDM pickle sets state on the result of the persistence hook
        raise _Refused("it sets state on a persistent object, which EDM's persistence never does")


def _reconstruct_stub(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise _Refused("its persistence record is not a dict of type 'class'")
    if meta.get("version") != _PERSISTENCE_VERSION:
        raise _Refused(f"its persistence record has version {meta.get('version')!r:.20}, expected "
                       f"{_PERSISTENCE_VERSION}")
    source, name, state = meta.get("module_src"), meta.get("class_name"), meta.get("state")
    if not isinstance(source, str) or not isinstance(name, str) or not isinstance(state, dict):
        raise _Refused("its persistence record lacks the module source, class name or state")
    stub = PersistentStub()
    stub.class_name, stub.state = name, state
    stub.init_kwargs = state.get("_init_kwargs")
    stub.source_sha256 = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    return stub


class _TorchContainer:
    """Inert stand-in for a torch.nn container module (ModuleDict, ...): keeps the pickled `__dict__`, runs nothing."""

    class_name = "container"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f"its {self.class_name} holds state of type {type(state).__name__}, expected a dict")
        self.state = state


def _container(name: str) -> type:
    return type(name, (_TorchContainer,), {"class_name": name})


def _check_ints(values, what: str) -> tuple:
    if not isinstance(values, (tuple, list)) or len(values) > _MAX_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _Refused(f"it declares a tensor {what} {values!r:.60}, expected at most {_MAX_DIMS} non-negative "
                       f"integers")
    return tuple(values)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 after checking that the view lies inside its storage."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused(f"it rebuilds a tensor from a {type(storage).__name__}, expected a storage")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    offset = _check_ints((offset,), "offset")[0]
    if len(size) != len(stride) or backward_hooks or metadata:
        raise _Refused("it declares a tensor with mismatched size and stride, hooks or extra metadata")
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > storage._size():  # _size: size() warns that TypedStorage is deprecated
        raise _Refused(f"it declares a tensor of size {list(size)} reaching element {extent} of a storage of "
                       f"{storage._size()}")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Parameters are kept as plain tensors."""
    if not isinstance(data, torch.Tensor):
        raise _Refused(f"it rebuilds a parameter from a {type(data).__name__}, expected a tensor")
    return data


def _numeric_scalar(dtype, data=None):
    """numpy's scalar(dtype, bytes), for numeric dtypes only, as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or dtype.hasobject:
        raise _Refused(f"it holds a numpy scalar of dtype {dtype!s:.40}, expected a numeric dtype")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Refused(f"it holds a numpy {dtype} scalar of {type(data).__name__} data, expected {dtype.itemsize} "
                       f"bytes")
    return np.frombuffer(data, dtype=dtype)[0].item()


class _PlainUnpickler(pickle.Unpickler):
    """For the header records of a legacy torch.save stream: plain data only."""

    def find_class(self, module, name):
        raise _Refused(f"a storage record names the global {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("a storage header holds a persistent id")


class _StorageRecordUnpickler(pickle.Unpickler):
    """The object record of a legacy torch.save stream of one storage: collects the storages it declares."""

    def __init__(self, file):
        super().__init__(file)
        self.declared = {}  # key -> (elements, bytes per element)

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_TYPES:
            return name
        raise _Refused(f"a storage record names the global {module}.{name}")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage" or pid[1] not in _STORAGE_TYPES
                or not isinstance(pid[2], str) or pid[3] != "cpu" or not isinstance(pid[4], int) or pid[4] < 0
                or pid[5] is not None):
            raise _Refused(f"a storage record holds the persistent id {pid!r:.80}, expected a CPU storage")
        self.declared[pid[2]] = (pid[4], _STORAGE_TYPES[pid[1]])  # elements, bytes per element
        return None


def _load_storage(data):
    """torch.storage._load_from_bytes(data), with the legacy stream's declared sizes checked against its length
    first, then read by torch.load(weights_only=True)."""
    if not isinstance(data, bytes):
        raise _Refused(f"it loads a storage from {type(data).__name__}, expected bytes")
    f = io.BytesIO(data)
    try:
        magic, protocol, info = (_PlainUnpickler(f).load() for _ in range(3))
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(info, dict) or \
                info.get("little_endian") is not True:
            raise _Refused("it holds a storage that is not a little-endian legacy torch.save stream")
        records = _StorageRecordUnpickler(f)
        records.load()
        keys = _PlainUnpickler(f).load()
        if not isinstance(keys, list) or sorted(keys) != sorted(records.declared):
            raise _Refused("it holds a storage stream whose key list does not match its records")
        for key in keys:
            numel, itemsize = records.declared[key]
            remaining = len(data) - f.tell() - 8
            if int.from_bytes(f.read(8), "little") != numel or numel * itemsize > remaining:
                raise _Refused(f"it declares a storage of {numel} elements of {itemsize} bytes where {remaining} "
                               f"bytes remain")
            f.seek(numel * itemsize, io.SEEK_CUR)
        if f.tell() != len(data):
            raise _Refused("it holds a storage stream with trailing bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as e:
        raise _Refused(f"it holds a storage that is not a legacy torch.save stream ({type(e).__name__})") from e
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for malformed streams
        raise _Refused(f"it holds a storage that torch.load(weights_only=True) refuses ({type(e).__name__})") from e
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused(f"it loads a {type(storage).__name__} where a storage was expected")
    return storage


class _AllowedFunction:
    """A function of the allow-list: callable by REDUCE, with no attributes a BUILD record could set."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)

    def __setstate__(self, state):
        raise _Refused("it sets state on an allowed function")


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _AllowedFunction(_reconstruct_stub),
    ("torch._utils", "_rebuild_tensor_v2"): _AllowedFunction(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _AllowedFunction(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _AllowedFunction(_rebuild_parameter),
    ("torch.storage", "_load_from_bytes"): _AllowedFunction(_load_storage),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,  # EDM's dict with attribute access: its items are all that matter
    ("numpy.core.multiarray", "scalar"): _AllowedFunction(_numeric_scalar),
    ("numpy._core.multiarray", "scalar"): _AllowedFunction(_numeric_scalar),
    ("numpy", "dtype"): np.dtype,
    **{("torch", name): getattr(torch, name) for name in _DTYPE_NAMES},
    **{("torch.nn.modules.container", name): _container(name)
       for name in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")},
    ("torch.nn.modules.activation", "SiLU"): _container("SiLU"),  # in PaDIS files: read, then refused by class
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"it names the global {module}.{name:.80}, which an EDM network pickle does not need "
                           f"and this reader does not allow")
        return found

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent id, which a plain pickle.dump of an EDM snapshot does not")


def read_edm_pickle(path: str):
    """The unpickled content of an EDM-format file, with every EDM network object a `PersistentStub`; nothing in
    the file is executed. Refuses (UserError naming the file) what `_RestrictedUnpickler` does not allow."""
    if not os.path.isfile(path):
        raise UserError(f"EDM pickle {path} does not exist.")
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":
            raise UserError(f"{path} is not an EDM network pickle (it does not start with a pickle protocol "
                            f"marker).")
        f.seek(0)
        try:
            return _RestrictedUnpickler(f).load()
        except _Refused as e:
            raise UserError(f"EDM pickle {path} is refused: {str(e).rstrip('.')}.") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                OverflowError, MemoryError, RecursionError) as e:
            raise UserError(f"{path} is not a readable EDM network pickle ({type(e).__name__}).") from None


# ----------------------------------------------------------------------------------------------------------------------
# EDM's network onto this project's.


def _flatten(obj, prefix: str, tensors: dict, modules: dict, depth: int = 0):
    """Walk a stub tree like nn.Module.state_dict: tensors {dotted name: tensor} of parameters and persistent buffers,
    modules {dotted name: stub or container}."""
    if depth > _MAX_DEPTH:
        raise _Refused(f"its modules nest deeper than {_MAX_DEPTH} levels")
    if isinstance(obj, PersistentStub):
        state = obj.state
    elif isinstance(obj, _TorchContainer) and isinstance(getattr(obj, "state", None), dict):
        state = obj.state
    else:
        raise _Refused(f"its module {prefix.rstrip('.') or 'ema'} is a {type(obj).__name__}, expected a network "
                       f"module")
    modules[prefix.rstrip(".")] = obj
    skipped = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers", "_modules"):
        entries = state.get(kind, {})
        if not isinstance(entries, dict):
            raise _Refused(f"its module {prefix.rstrip('.') or 'ema'} holds {kind} of type {type(entries).__name__}")
        for name, value in entries.items():
            if not isinstance(name, str):
                raise _Refused(f"its module {prefix.rstrip('.') or 'ema'} has a {kind[1:-1]} named {name!r:.40}")
            if value is None or (kind == "_buffers" and name in skipped):
                continue
            if kind == "_modules":
                _flatten(value, f"{prefix}{name}.", tensors, modules, depth + 1)
            elif isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            else:
                raise _Refused(f"its {kind[1:-1]} {prefix}{name} is a {type(value).__name__}, expected a tensor")


def _plain(value, what: str):
    """A constructor argument as a JSON value: a number, string, boolean or None, or a list of them (EDM's
    arguments are never nested deeper)."""
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _Refused(f"its argument {what} is a {type(value).__name__}, expected a number, string or list of them")


def _network_config(root: PersistentStub) -> tuple[dict, dict]:
    """EDM's recorded constructor arguments, completed with EDM's defaults -> (this project's network config, the
    EDM argument values that matter to the key mapping)."""
    precond = root.class_name
    if precond in _REFUSED_ROOTS:
        raise _Refused(f"its network is {precond}, {_REFUSED_ROOTS[precond]}")
    if precond not in _EDM_PRECOND_DEFAULTS:
        raise _Refused(f"its network is of class {precond:.60}, expected EDM's EDMPrecond, VPPrecond or VEPrecond")
    kwargs = root.init_kwargs
    init_args = root.state.get("_init_args")
    if not isinstance(kwargs, dict) or init_args not in ((), [], None):
        raise _Refused("its network does not record its constructor arguments as keywords")
    kwargs = {str(k): _plain(v, str(k)) for k, v in kwargs.items()}
    for name in ("img_resolution", "img_channels"):
        if not isinstance(kwargs.get(name), int) or isinstance(kwargs.get(name), bool):
            raise _Refused(f"its network does not record an integer {name}")
    args = {**_EDM_PRECOND_DEFAULTS[precond], **kwargs}
    model_type = args["model_type"]
    if model_type not in _EDM_MODEL_DEFAULTS:
        raise _Refused(f"its network's model_type is {model_type!r:.40}, expected SongUNet or DhariwalUNet")
    args = {**_EDM_MODEL_DEFAULTS[model_type], **args}
    known = {"img_resolution", "img_channels", *_EDM_PRECOND_DEFAULTS[precond], *_EDM_MODEL_DEFAULTS[model_type]}
    unknown = sorted(set(args) - known)
    if unknown:
        raise _Refused(f"its {precond} over {model_type} has the argument {unknown[0]!r:.40}, which EDM's "
                       f"networks do not have")

    network = dict(img_resolution=args["img_resolution"], in_channels=args["img_channels"],
                   out_channels=args["img_channels"], label_dim=args["label_dim"], model_type=model_type)
    network.update({k: args[k] for k in _EDM_MODEL_DEFAULTS[model_type] if k != "augment_dim"})
    if model_type == "SongUNet" and args["label_dim"]:
        network["label_before_mlp"] = True  # EDM's DDPM++ / NCSN++ embed labels before the noise MLP
    if precond == "EDMPrecond":
        network["sigma_data"] = args["sigma_data"]
        # Only finite bounds fit a JSON config; EDM's defaults (0, inf) are this project's defaults too.
        network.update({k: args[k] for k in ("sigma_min", "sigma_max") if args[k] not in (0, math.inf)})
    elif precond == "VPPrecond":
        network.update({k: args[k] for k in ("beta_d", "beta_min", "M", "epsilon_t")})
    else:
        network.update({k: args[k] for k in ("sigma_min", "sigma_max")})
    return dict(class_name=f"training.networks.{precond}", kwargs=network), args


def _module_table(args: dict) -> dict:
    """{this project's module name: EDM's module name} for the UNet the arguments describe (training/networks.py
    `_UNet` for ours, EDM's enc / dec dicts keyed by resolution for theirs)."""
    song = args["model_type"] == "SongUNet"
    res = [args["img_resolution"] >> level for level in range(len(args["channel_mult"]))]
    last = len(res) - 1
    table = {"model.noise_embedding": "model.map_noise", "model.noise_mlp.0": "model.map_layer0",
             "model.noise_mlp.2": "model.map_layer1", "model.label_embedding": "model.map_label",
             "model.input_conv": f"model.enc.{res[0]}x{res[0]}_conv",
             "model.middle.0": f"model.dec.{res[last]}x{res[last]}_in0",
             "model.middle.1": f"model.dec.{res[last]}x{res[last]}_in1"}
    aux = {"skip": "aux_skip", "residual": "aux_residual"}.get(args.get("encoder_type"))
    for level, r in enumerate(res):
        enc, dec = f"model.enc.{r}x{r}", f"model.dec.{r}x{r}"
        if level > 0:
            table[f"model.down_blocks.{level - 1}"] = f"{enc}_down"
            if aux:
                table[f"model.encoder_aux.{level - 1}"] = f"{enc}_{aux}"
        if level < last:
            table[f"model.up_blocks.{level}"] = f"{dec}_up"
        for index in range(args["num_blocks"]):
            table[f"model.encoder.{level}.{index}"] = f"{enc}_block{index}"
        for index in range(args["num_blocks"] + 1):
            table[f"model.decoder.{level}.{index}"] = f"{dec}_block{index}"
        if song and (args["decoder_type"] == "skip" or level == 0):
            head = level if args["decoder_type"] == "skip" else 0
            table[f"model.output_heads.{head}.0"] = f"{dec}_aux_norm"
            table[f"model.output_heads.{head}.2"] = f"{dec}_aux_conv"
    if not song:
        table["model.output_heads.0.0"], table["model.output_heads.0.2"] = "model.out_norm", "model.out_conv"
    return table


# Inside a UNet block: our names -> EDM's.
_BLOCK_PARTS = {"emb_proj.": "affine.", "attention.norm.": "norm2.", "attention.qkv.": "qkv.",
                "attention.proj.": "proj."}


def _edm_name(name: str, table: dict) -> str:
    """Our weight or module name -> EDM's."""
    module, rest = name, ""
    while module not in table:
        if "." not in module:
            raise _Refused(f"this project's weight {name} has no counterpart in EDM's layout")
        module, last = module.rsplit(".", 1)
        rest = f"{last}.{rest}"
    for ours, theirs in _BLOCK_PARTS.items():
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
    return f"{table[module]}.{rest}".rstrip(".")


def _qkv_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """EDM's qkv rows (head, channel, q/k/v) -> ours (q/k/v, head, channel)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, rows // (3 * heads), 3, *tensor.shape[1:]).movedim(2, 0).reshape(tensor.shape)


def _check_resample_filters(tensors: dict, taps):
    t = torch.as_tensor(taps, dtype=torch.float64)
    expected = (torch.outer(t, t) / t.sum() ** 2)[None, None]
    for name, value in tensors.items():
        if name.endswith(".resample_filter") and (tuple(value.shape) != tuple(expected.shape) or not torch.allclose(
                value.to(torch.float64), expected, rtol=1e-6, atol=1e-7)):
            raise _Refused(f"its buffer {name} is not the resample filter {list(taps)} of its configuration")


def _check_norms_and_heads(net: torch.nn.Module, stubs: dict, table: dict):
    """The group counts, epsilons and head counts EDM recorded must be ours (they are not weights, so a mismatch
    would not show in the shapes)."""
    for name, module in net.named_modules():
        if isinstance(module, networks.GroupNorm):
            edm, checks = _edm_name(name, table), (("num_groups", module.num_groups), ("eps", module.eps))
        elif isinstance(module, networks.SelfAttention):  # EDM keeps the head count on the block
            edm, checks = _edm_name(name.rsplit(".", 1)[0], table), (("num_heads", module.num_heads),)
        else:
            continue
        state = getattr(stubs.get(edm), "state", {})
        for key, ours in checks:
            if key in state and state[key] != ours:
                raise _Refused(f"its module {edm} has {key} {state[key]!r:.20}, this project's network {ours}")


def convert_edm(path: str) -> tuple[dict, dict]:
    """Read an EDM-format network pickle without executing it -> (snapshot config for an image prior, as
    training/snapshot.py's save_snapshot / check_snapshot_config expect; the EMA state dict of the network that
    config builds). Refuses (UserError, one sentence naming the file) whatever does not map exactly. Nothing the size
    of the described network is allocated before its weight count is checked against the tensors the file holds."""
    data = read_edm_pickle(path)
    try:
        root = data.get("ema") if isinstance(data, dict) else None
        if not isinstance(root, PersistentStub):
            raise _Refused("it holds no EDM network under 'ema'")
        network, args = _network_config(root)
        config = {"network": network, "dataset": {"kind": "image", "label_dim": args["label_dim"], "image_shape": [
            args["img_channels"], args["img_resolution"], args["img_resolution"]]}}
        tensors, stubs = {}, {}
        _flatten(root, "", tensors, stubs)
        for name, stub in stubs.items():
            if isinstance(stub, PersistentStub) and name and stub.class_name not in _EDM_MODULE_CLASSES:
                raise _Refused(f"its module {name} is of class {stub.class_name:.60}, which EDM's DDPM++ / NCSN++ / "
                               f"ADM networks do not have")
        if stubs.get("model") is None or getattr(stubs["model"], "class_name", None) != args["model_type"]:
            raise _Refused(f"its model is not the {args['model_type']} its arguments name")
        _check_resample_filters(tensors, args.get("resample_filter", [1, 1]))
        try:
            checkpoint.check_snapshot_config(config)
            with torch.device("meta"):  # names and shapes only: the arguments could describe any size of network
                net = checkpoint.build_network(network)
        except ConfigError as e:
            raise _Refused(f"its network maps to a config this project refuses ({str(e).rstrip('.')})") from e
        needed, held = sum(v.numel() for v in net.state_dict().values()), sum(t.numel() for t in tensors.values())
        if needed > held:
            raise _Refused(f"its arguments describe a network of {needed} weights, but it holds {held}")

        table = _module_table(args)
        _check_norms_and_heads(net, stubs, table)
        state, used = {}, set()
        for name, ours in net.state_dict().items():
            edm = _edm_name(name, table)
            if edm not in tensors:
                raise _Refused(f"it has no weight {edm}, which its configuration implies")
            value = tensors[edm]
            if not value.is_floating_point() or tuple(value.shape) != tuple(ours.shape):
                raise _Refused(f"its weight {edm} is {value.dtype} of shape {list(value.shape)}, expected float of "
                               f"shape {list(ours.shape)}")
            if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
                value = _qkv_rows(value, net.get_submodule(name.rsplit(".", 2)[0]).num_heads)
            if args["model_type"] == "SongUNet" and name == "model.noise_mlp.0.weight":
                value = value.roll(value.shape[1] // 2, dims=1)  # EDM's [sin | cos] columns -> our [cos | sin]
            elif args["model_type"] == "SongUNet" and name.startswith("model.label_embedding."):
                value = value.roll(value.shape[0] // 2, dims=0)  # its outputs add to those noise features
            state[name] = value.to(torch.float32).contiguous().clone()
            used.add(edm)
        dropped = {n for n in tensors if n.endswith(".resample_filter") or n == "model.map_augment.weight"}
        extra = sorted(set(tensors) - used - dropped)
        if extra:
            raise _Refused(f"it has the weight {extra[0]:.80}, which this project's network has no place for")
    except _Refused as e:
        raise UserError(f"EDM pickle {path} is refused: {str(e).rstrip('.')}.") from None
    return config, state
