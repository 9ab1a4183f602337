"""EDM-format pickles (training/conversion/edm.py), built here in EDM's persistence layout, nothing downloaded.

A persistence pickle is `_reconstruct_persistent_obj(meta)` with meta holding the module source: ours holds a source
that would write a canary file if it were ever executed. The EDM key layout is produced from one of this project's
networks by a key table written here (independently of the converter's, in the other direction), so a converted
network must reproduce the network it came from. Crafted pickles are refused in one sentence with nothing written.
(The mapping was also checked out of the tree against EDM's own networks: see the issue-24 note.)
"""

import collections
import hashlib
import io
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch

from dnnlib import UserError
from tests.helpers import file_tree
from training import snapshot as checkpoint
from training.conversion import write_converted_snapshot
from training.conversion.edm import convert_edm, read_edm_pickle


def _reconstruct_persistent_obj(meta):  # the name EDM's pickles call; never called by the converter
    raise AssertionError("the persistence hook of a test pickle was called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@pytest.fixture
def persistence(monkeypatch, tmp_path):
    """Lets pickle find the hook under EDM's module name while the test writes its pickles -> the canary path."""
    monkeypatch.setitem(sys.modules, "torch_utils.persistence",
                        types.SimpleNamespace(_reconstruct_persistent_obj=_reconstruct_persistent_obj))
    return tmp_path / "canary-written-by-embedded-source"


def module_source(canary) -> str:
    return f"import pathlib\npathlib.Path({str(canary)!r}).write_text('executed')\n"


class Persistent:
    """Pickles as EDM's persistence does: the hook with one meta dict holding the module source and the state."""

    def __init__(self, class_name, source, params=None, buffers=None, modules=None, **attributes):
        self.class_name, self.source = class_name, source
        self.state = dict(training=False, _parameters=collections.OrderedDict(params or {}),
                          _buffers=collections.OrderedDict(buffers or {}), _non_persistent_buffers_set=set(),
                          _modules=collections.OrderedDict(modules or {}), _init_args=(), **attributes)

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.source, class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,)


# ----------------------------------------------------------------------------------------------------------------------
# EDM's layout, written from its networks.py's naming (enc / dec dicts keyed '{res}x{res}_...', map_*, affine, norm2,
# qkv rows (head, channel, q/k/v), [sin | cos] noise features), from one of our networks.


def fir(taps):
    t = torch.tensor(taps, dtype=torch.float32)
    return (torch.outer(t, t) / t.sum() ** 2)[None, None]


def edm_layout(net, kw: dict, song: bool) -> dict:
    """Our network's weights under EDM's names -> {EDM name: tensor}."""
    ours = net.state_dict()
    out = {}
    taps = kw.get("resample_filter", [1, 1])

    def put(edm, mine):
        for key, value in ours.items():
            if key.startswith(mine + "."):
                out[f"{edm}.{key[len(mine) + 1:]}"] = value.clone()

    def block(edm, mine, resample=False):
        for a, b in (("norm0", "norm0"), ("conv0", "conv0"), ("affine", "emb_proj"), ("norm1", "norm1"),
                     ("conv1", "conv1"), ("norm2", "attention.norm"), ("proj", "attention.proj")):
            put(f"{edm}.{a}", f"{mine}.{b}")
        if f"{mine}.skip.weight" in ours:
            put(f"{edm}.skip", f"{mine}.skip")
        for part in ("weight", "bias"):
            qkv = ours.get(f"{mine}.attention.qkv.{part}")
            if qkv is not None:
                heads = net.get_submodule(f"{mine}.attention").num_heads
                rows = qkv.reshape(3, heads, -1, *qkv.shape[1:]).permute(1, 2, 0, *range(3, qkv.ndim + 2))
                out[f"{edm}.qkv.{part}"] = rows.reshape(qkv.shape).clone()
        if resample:
            out[f"{edm}.conv0.resample_filter"] = fir(taps)
            out[f"{edm}.skip.resample_filter"] = fir(taps)

    res = [kw["img_resolution"] >> level for level in range(len(kw["channel_mult"]))]
    half = ours["model.noise_mlp.0.weight"].shape[1] // 2
    w0 = ours["model.noise_mlp.0.weight"]
    out["model.map_layer0.weight"] = torch.cat([w0[:, half:], w0[:, :half]], 1) if song else w0.clone()
    out["model.map_layer0.bias"] = ours["model.noise_mlp.0.bias"].clone()
    put("model.map_layer1", "model.noise_mlp.2")
    put("model.map_noise", "model.noise_embedding")
    if song and "model.label_embedding.weight" in ours:  # added to the [sin | cos] features
        for part in ("weight", "bias"):
            label = ours[f"model.label_embedding.{part}"]
            out[f"model.map_label.{part}"] = torch.cat([label[half:], label[:half]])
    else:
        put("model.map_label", "model.label_embedding")
    if kw.get("augment_dim"):
        out["model.map_augment.weight"] = torch.randn(w0.shape[1], kw["augment_dim"])  # dropped by the converter
    put(f"model.enc.{res[0]}x{res[0]}_conv", "model.input_conv")
    for level, r in enumerate(res):
        if level:
            block(f"model.enc.{r}x{r}_down", f"model.down_blocks.{level - 1}", resample=True)
            if kw.get("encoder_type") == "residual":
                put(f"model.enc.{r}x{r}_aux_residual", f"model.encoder_aux.{level - 1}")
                out[f"model.enc.{r}x{r}_aux_residual.resample_filter"] = fir(taps)
        for i in range(kw["num_blocks"]):
            block(f"model.enc.{r}x{r}_block{i}", f"model.encoder.{level}.{i}")
    block(f"model.dec.{res[-1]}x{res[-1]}_in0", "model.middle.0")
    block(f"model.dec.{res[-1]}x{res[-1]}_in1", "model.middle.1")
    for level in reversed(range(len(res))):
        r = res[level]
        if level < len(res) - 1:
            block(f"model.dec.{r}x{r}_up", f"model.up_blocks.{level}", resample=True)
        for i in range(kw["num_blocks"] + 1):
            block(f"model.dec.{r}x{r}_block{i}", f"model.decoder.{level}.{i}")
    if song:
        put(f"model.dec.{res[0]}x{res[0]}_aux_norm", "model.output_heads.0.0")
        put(f"model.dec.{res[0]}x{res[0]}_aux_conv", "model.output_heads.0.2")
    else:
        put("model.out_norm", "model.output_heads.0.0")
        put("model.out_conv", "model.output_heads.0.2")
    return out


def edm_class(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    if last in ("enc", "dec"):
        return "ModuleDict"
    if any(last.endswith(s) for s in ("_down", "_up", "_in0", "_in1")) or "_block" in last:
        return "UNetBlock"
    if "norm" in last:
        return "GroupNorm"
    if last in ("affine", "map_layer0", "map_layer1", "map_label", "map_augment"):
        return "Linear"
    if last == "map_noise":
        return "FourierEmbedding"
    return "Conv2d"


def edm_tree(tensors: dict, source: str, root_class: str, init_kwargs: dict, model_class: str, song: bool,
             classes: dict | None = None):
    """EDM's module tree over {EDM name: tensor}: persistence objects, with torch's ModuleDict for enc / dec."""
    names = set()
    for key in tensors:
        while "." in key:
            key = key.rsplit(".", 1)[0]
            names.add(key)
    if song:
        names.add("model.map_noise")  # DDPM++'s positional embedding has no weights but is a module
    children = collections.defaultdict(dict)
    for name in sorted(names, key=lambda n: -n.count(".")):
        params = {k.rsplit(".", 1)[1]: torch.nn.Parameter(v, requires_grad=False) for k, v in tensors.items()
                  if k.rsplit(".", 1)[0] == name and not k.endswith(("resample_filter", "freqs"))}
        buffers = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                   if k.rsplit(".", 1)[0] == name and k.endswith(("resample_filter", "freqs"))}
        cls = (classes or {}).get(name) or (model_class if name == "model" else edm_class(name))
        if cls == "ModuleDict":
            module = torch.nn.ModuleDict()
            module._modules = children[name]
        else:
            if name == "model.map_noise" and song and not buffers:
                cls = "PositionalEmbedding"
            module = Persistent(cls, source, params, buffers, children[name])
        parent, _, last = name.rpartition(".")
        children[parent][last] = module
    return Persistent(root_class, source, modules=children[""], _init_kwargs=init_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Configurations: EDM's argument names and values (EDM's defaults differ from ours: channel_mult is always given).

SONG = dict(img_resolution=16, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], dropout=0.13, augment_dim=9, use_fp16=False,
            embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
            resample_filter=[1, 1])
NCSN = dict(SONG, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
ADM = dict(img_resolution=8, img_channels=2, model_type="DhariwalUNet", label_dim=4, model_channels=64,
           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9)
CASES = {"ddpmpp-vp": ("VPPrecond", SONG), "ncsnpp-ve": ("VEPrecond", NCSN), "adm-edm-cond": ("EDMPrecond", ADM),
         "ddpmpp-edm-cond": ("EDMPrecond", dict(SONG, label_dim=10, sigma_data=0.5))}


def ours_for(precond: str, kw: dict):
    """Our network for EDM arguments (translated by hand here), with seeded weights of realistic scale."""
    mine = {k: v for k, v in kw.items() if k not in ("img_channels", "augment_dim", "use_fp16")}
    mine.update(in_channels=kw["img_channels"], out_channels=kw["img_channels"], label_dim=kw.get("label_dim", 0))
    if kw["model_type"] == "SongUNet" and kw.get("label_dim"):
        mine["label_before_mlp"] = True
    net = checkpoint.build_network({"class_name": f"training.networks.{precond}", "kwargs": mine}).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5 + (1.0 if "norm" in name else 0.0))
    return net


def write_case(path, canary, case: str, classes=None, **changes) -> tuple:
    precond, kw = CASES[case]
    net = ours_for(precond, kw)
    song = kw["model_type"] == "SongUNet"
    tensors = edm_layout(net, kw, song)
    root = edm_tree(tensors, module_source(canary), precond, {**kw, **changes}, kw["model_type"], song, classes)
    path.write_bytes(pickle.dumps(dict(ema=root, loss_fn=None, dataset_kwargs=dict(path="data.zip")), protocol=4))
    return net, tensors, root


def outputs(net, kw, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, kw["img_channels"], kw["img_resolution"], kw["img_resolution"], generator=g)
    labels = torch.eye(kw["label_dim"])[:3] if kw.get("label_dim") else None
    with torch.no_grad():
        return net(x, torch.tensor([0.03, 1.7, 60.0]), labels)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_network_reproduces_the_source_and_runs_nothing(tmp_path, persistence, case):
    source = tmp_path / "network-snapshot-000000.pkl"
    original, _, _ = write_case(source, persistence, case)
    assert module_source(persistence).encode() in source.read_bytes()  # the source a real loader would execute
    stub = read_edm_pickle(str(source))["ema"]
    assert stub.source_sha256 == hashlib.sha256(module_source(persistence).encode()).hexdigest()

    config, state = convert_edm(str(source))
    dest = tmp_path / "converted.pt"
    write_converted_snapshot(str(dest), config, state)
    net, loaded_config = checkpoint.load_snapshot(str(dest))
    assert not persistence.exists()
    assert loaded_config["dataset"]["image_shape"] == [CASES[case][1]["img_channels"],
                                                       *[CASES[case][1]["img_resolution"]] * 2]
    expected, got = outputs(original, CASES[case][1]), outputs(net, CASES[case][1])
    assert expected.abs().max() > 1  # the comparison is not of zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_edm_defaults_fill_the_arguments_the_file_omits(tmp_path, persistence):
    """A file without dropout / channel_mult_emb / label_dim gets EDM's values (0.10, 4, 0), not ours."""
    source = tmp_path / "net.pkl"
    kw = {k: v for k, v in SONG.items() if k not in ("dropout", "augment_dim", "use_fp16")}
    CASES["ddpmpp-defaults"] = ("VPPrecond", kw)
    try:
        write_case(source, persistence, "ddpmpp-defaults")
    finally:
        del CASES["ddpmpp-defaults"]
    config, _ = convert_edm(str(source))
    network = config["network"]["kwargs"]
    assert network["dropout"] == 0.10 and network["channel_mult_emb"] == 4 and network["label_dim"] == 0
    assert (network["beta_d"], network["beta_min"], network["M"], network["epsilon_t"]) == (19.9, 0.1, 1000, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals: one sentence naming the file, nothing written.


def assert_refused(path, tmp_path, *words):
    before = file_tree(tmp_path)
    dest = tmp_path / "converted.pt"
    with pytest.raises(UserError) as error:
        config, state = convert_edm(str(path))
        write_converted_snapshot(str(dest), config, state)
    message = str(error.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    assert file_tree(tmp_path) == before


class Reduce:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_os_system_through_reduce_is_refused(tmp_path, persistence):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Reduce(os.system, f"touch {persistence}")}))
    assert_refused(path, tmp_path, "system")
    assert not persistence.exists()


def test_unknown_global_is_refused(tmp_path, persistence):
    path = tmp_path / "net.pkl"
    write_case(path, persistence, "ddpmpp-vp")
    data = path.read_bytes()
    crafted = data.replace(b"\x8c\x0bOrderedDict", b"\x8c\x0bdefaultdict", 1)  # a name of the same length
    assert crafted != data
    path.write_bytes(crafted)
    assert_refused(path, tmp_path, "collections.defaultdict")


def test_non_numeric_numpy_scalar_is_refused(tmp_path, persistence):
    path = tmp_path / "net.pkl"
    write_case(path, persistence, "ddpmpp-vp", dropout=np.str_("0.1"))
    assert_refused(path, tmp_path, "numpy scalar", "<U3")


def test_tensor_beyond_its_storage_is_refused(tmp_path, persistence):
    storage = torch.ones(4).untyped_storage()
    tensor = Reduce(torch._utils._rebuild_tensor_v2, torch.storage.TypedStorage(wrap_storage=storage,
                    dtype=torch.float32, _internal=True), 0, (100,), (1,), False, collections.OrderedDict())
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": tensor}))
    assert_refused(path, tmp_path, "size [100]", "storage of 4")


def test_storage_larger_than_the_file_is_refused(tmp_path, persistence):
    stream = io.BytesIO()
    storage = torch.storage.TypedStorage(wrap_storage=torch.ones(4).untyped_storage(), dtype=torch.float32,
                                         _internal=True)
    torch.save(storage, stream, _use_new_zipfile_serialization=False)  # the stream EDM's storages pickle as
    declared = stream.getvalue().replace(b"cpuq\x03K\x04N", b"cpuq\x03J" + struct.pack("<i", 2**30) + b"N", 1)
    assert declared != stream.getvalue()
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": Reduce(torch.storage._load_from_bytes, declared)}))
    assert_refused(path, tmp_path, "1073741824 elements")


def test_weight_of_the_wrong_shape_is_refused(tmp_path, persistence):
    path = tmp_path / "net.pkl"
    _, tensors, root = write_case(path, persistence, "ddpmpp-vp")
    layer = root.state["_modules"]["model"].state["_modules"]["map_layer1"]
    layer.state["_parameters"]["weight"] = torch.nn.Parameter(tensors["model.map_layer1.weight"].T[:, :-1].clone(),
                                                              requires_grad=False)
    path.write_bytes(pickle.dumps({"ema": root}))
    assert_refused(path, tmp_path, "model.map_layer1.weight", "shape")


@pytest.mark.parametrize("root_class, words", [("Precond", ("EDM2",)), ("iDDPMPrecond", ("iDDPM",)),
                                               ("Patch_EDMPrecond", ("PaDIS", "pad width")),
                                               ("GANPrecond", ("GANPrecond",))])
def test_networks_that_do_not_map_are_refused(tmp_path, persistence, root_class, words):
    path = tmp_path / "net.pkl"
    _, _, root = write_case(path, persistence, "ddpmpp-vp")
    root.class_name = root_class
    path.write_bytes(pickle.dumps({"ema": root}))
    assert_refused(path, tmp_path, *words)


def test_gated_convolutions_and_unknown_arguments_are_refused(tmp_path, persistence):
    """Ambient Diffusion's networks carry other layer classes and arguments than EDM's."""
    path = tmp_path / "net.pkl"
    write_case(path, persistence, "ddpmpp-vp", classes={"model.enc.16x16_conv": "GatedConv2d"})
    assert_refused(path, tmp_path, "model.enc.16x16_conv", "GatedConv2d")
    write_case(path, persistence, "ddpmpp-vp", gated=True)
    assert_refused(path, tmp_path, "'gated'")


def test_arguments_describing_a_larger_network_than_the_file_are_refused(tmp_path, persistence):
    """The arguments choose the network built before its weights are compared: it is built on the meta device and
    refused when it needs more weights than the file holds, so a small file cannot make the converter allocate."""
    path = tmp_path / "net.pkl"
    write_case(path, persistence, "ddpmpp-vp", model_channels=1024, channel_mult=[16, 16])
    assert_refused(path, tmp_path, "a network of", "weights, but it holds")


def test_recorded_group_counts_must_be_ours(tmp_path, persistence):
    """Group counts are not weights: a GroupNorm that EDM recorded with other groups than ours is refused."""
    path = tmp_path / "net.pkl"
    _, _, root = write_case(path, persistence, "ddpmpp-vp")
    block = root.state["_modules"]["model"].state["_modules"]["enc"]._modules["16x16_block0"]
    block.state["_modules"]["norm0"].state.update(num_groups=3, eps=1e-6)
    path.write_bytes(pickle.dumps({"ema": root}))
    assert_refused(path, tmp_path, "model.enc.16x16_block0.norm0", "num_groups 3")


def test_a_torch_zip_file_is_refused(tmp_path):
    path = tmp_path / "snapshot.pt"
    torch.save({"ema": {}}, path)
    assert_refused(path, tmp_path, "pickle protocol marker")
