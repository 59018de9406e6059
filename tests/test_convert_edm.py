"""tools/convert_edm.py: a restricted unpickler that never runs code from the file, a faithful import of
EDM's DDPM++, NCSN++ and ADM snapshots, and one-line errors.

The snapshots here are synthetic: built by pickling objects whose __reduce__ points at a fake
torch_utils.persistence._reconstruct_persistent_obj with EDM's meta layout (type, version, module_src,
class_name, state), as EDM's persistence module writes them.
"""

import collections
import importlib.util
import os
import pickle
import sys
import types

import pytest
import torch

import edm_teacher as E
from conftest import ROOT, TINY_NET, run_script

TOOL = os.path.join(ROOT, "tools", "convert_edm.py")
_spec = importlib.util.spec_from_file_location("convert_edm", TOOL)
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)
PWNED = "/tmp/edm_import_test_pwned"


def _reconstruct_persistent_obj(meta):  # what EDM's loader is: it would exec(meta["module_src"])
    exec(meta["module_src"])
    raise AssertionError("the real reconstruct function must never be called by our loader")


class FakePersistent:
    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(
            type="class",
            version=6,
            class_name=self.class_name,
            state=self.state,
            module_src=f"open({PWNED!r}, 'w').write('executed')",
        )
        return (_reconstruct_persistent_obj, (meta,))


def fake_module_dict(state):
    """A real torch.nn.ModuleDict holding the given __dict__: pickles as NEWOBJ ModuleDict + BUILD state."""
    md = object.__new__(torch.nn.ModuleDict)
    md.__dict__.update(state)
    return md


def as_edm_pickle_tree(module, init_kwargs=None):
    """Our nn.Module -> the object tree EDM's persistence would pickle."""
    state = dict(
        training=False,
        _parameters=collections.OrderedDict(module._parameters),
        _buffers=collections.OrderedDict(module._buffers),
        _non_persistent_buffers_set=set(),
        _modules=collections.OrderedDict((k, as_edm_pickle_tree(m)) for k, m in module._modules.items()),
        _forward_hooks=collections.OrderedDict(),
    )
    if isinstance(module, torch.nn.ModuleDict):
        return fake_module_dict(state)
    if init_kwargs is not None:
        state.update(
            _init_args=(), _init_kwargs=init_kwargs, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5
        )
    name = {"EDMPrecond": "EDMPrecond", "UNet": "SongUNet"}.get(type(module).__name__, type(module).__name__)
    return FakePersistent(name, state)


@pytest.fixture
def fake_persistence(monkeypatch):
    mod = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    if os.path.exists(PWNED):
        os.remove(PWNED)
    yield
    assert not os.path.exists(PWNED), "code from the pickle was executed"


EDM_KWARGS = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    augment_dim=9,
    dropout=0.13,
    use_fp16=False,
    img_resolution=16,
    img_channels=3,
    label_dim=4,
)


def write_snapshot(path, net, init_kwargs):
    snapshot = dict(
        ema=as_edm_pickle_tree(net, init_kwargs),
        loss_fn=FakePersistent("EDMLoss", {"P_mean": -1.2}),
        augment_pipe=None,
        dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset"},
    )
    with open(path, "wb") as f:
        pickle.dump(snapshot, f)


# EDM's train.py --arch ncsnpp (its "-ve" snapshots), at the tests' tiny size
NCSN_KWARGS = dict(
    EDM_KWARGS,
    embedding_type="fourier",
    encoder_type="residual",
    channel_mult_noise=2,
    resample_filter=[1, 3, 3, 1],
)


def random_net(net_kwargs):
    torch.manual_seed(0)
    net = E.build_net(net_kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net.requires_grad_(False)


@pytest.mark.parametrize("arch, init_kwargs", [("ddpmpp", EDM_KWARGS), ("ncsnpp", NCSN_KWARGS)])
def test_edm_format_snapshot_imports_exactly(tmp_path, fake_persistence, capsys, arch, init_kwargs):
    net = random_net(
        dict(arch=arch, img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **TINY_NET)
    )
    write_snapshot(tmp_path / "snap.pkl", net, init_kwargs)
    ckpt = C.import_edm_pickle(str(tmp_path / "snap.pkl"))
    assert ckpt["method"] == "edm_teacher" and ckpt["net_kwargs"]["label_dim"] == 4
    assert ckpt["net_kwargs"]["arch"] == arch
    assert ckpt["net_kwargs"]["dropout"] == 0.13 and ckpt["net_kwargs"]["augment_dim"] == 9
    ref = net.state_dict()
    assert list(ckpt["ema"]) == list(ref) and all(torch.equal(ckpt["ema"][k], v) for k, v in ref.items())
    imported = E.build_net(ckpt["net_kwargs"]).eval()
    imported.load_state_dict(ckpt["ema"])
    x, sigma, labels = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        assert torch.equal(imported(x, sigma, labels), net(x, sigma, labels))
    # the command writes it as our (weights-only) checkpoint format, and never over an existing file
    C.main([str(tmp_path / "snap.pkl"), str(tmp_path / "conv.pt")])
    assert capsys.readouterr().out.count("\n") == 1
    conv = torch.load(tmp_path / "conv.pt", weights_only=True)
    assert conv["net_kwargs"] == ckpt["net_kwargs"] and torch.equal(
        conv["ema"]["model.map_label.weight"], ref["model.map_label.weight"]
    )
    assert set(conv) == {
        "method",
        "version",
        "args",
        "net_kwargs",
        "net",
        "ema",
        "opt",
        "step",
        "kimg",
        "state",
    }
    assert conv["version"] == 1 and conv["opt"] is None and conv["step"] == 0 and conv["kimg"] == 0.0
    with pytest.raises(SystemExit, match="exists; pass --overwrite") as e:
        C.main([str(tmp_path / "snap.pkl"), str(tmp_path / "conv.pt")])
    assert "\n" not in str(e.value)
    C.main([str(tmp_path / "snap.pkl"), str(tmp_path / "conv.pt"), "--overwrite"])
    assert sorted(os.listdir(tmp_path)) == ["conv.pt", "snap.pkl"]  # no temporary file left behind


def test_ncsnpp_snapshot_maps_to_arch_ncsnpp(tmp_path, fake_persistence, monkeypatch):
    # EDM's "-ve" snapshots are EDMPrecond(SongUNet) with NCSN++'s settings: arch "ncsnpp", EDM's keys as they are
    # (the weights' check against the UNet is replaced here, so this runs before the UNet block has ncsnpp)
    net = random_net(dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **TINY_NET))
    write_snapshot(tmp_path / "ve.pkl", net, NCSN_KWARGS)
    built = []

    class Checked:
        def load_state_dict(self, state_dict, strict):
            built.append((state_dict, strict))

    monkeypatch.setattr(E, "build_net", lambda net_kwargs: built.append(net_kwargs) or Checked())
    ckpt = C.import_edm_pickle(str(tmp_path / "ve.pkl"))
    expected = dict(
        arch="ncsnpp", img_resolution=16, img_channels=3, label_dim=4, sigma_data=0.5, augment_dim=9
    )
    expected.update(TINY_NET, dropout=0.13)
    assert ckpt["net_kwargs"] == expected and built[0] == expected
    assert built[1][0] is ckpt["ema"] and built[1][1] is True
    ref = net.state_dict()
    assert list(ckpt["ema"]) == list(ref) and all(torch.equal(ckpt["ema"][k], v) for k, v in ref.items())
    assert ckpt["state"]["edm_init_kwargs"]["resample_filter"] == [1, 3, 3, 1]


def test_adm_snapshot_imports_exactly(tmp_path, fake_persistence):
    # EDM's ImageNet-64 snapshot is EDMPrecond(model_type="DhariwalUNet"): same pickle format, ADM weights
    kw = dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    net = random_net(dict(arch="adm", img_resolution=16, img_channels=3, label_dim=4, **kw))
    init_kwargs = dict(img_resolution=16, img_channels=3, label_dim=4, model_type="DhariwalUNet", **kw)
    write_snapshot(tmp_path / "adm.pkl", net, init_kwargs)
    ckpt = C.import_edm_pickle(str(tmp_path / "adm.pkl"))
    assert ckpt["net_kwargs"]["arch"] == "adm" and ckpt["net_kwargs"]["dropout"] == 0.10  # EDM's default
    ref = net.state_dict()
    assert list(ckpt["ema"]) == list(ref) and all(torch.equal(ckpt["ema"][k], v) for k, v in ref.items())
    imported = E.build_net(ckpt["net_kwargs"]).eval()
    imported.load_state_dict(ckpt["ema"])
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(imported(x, sigma, labels), net(x, sigma, labels))
    assert not os.path.exists(PWNED)


def test_other_variants_are_refused_clearly(tmp_path, fake_persistence):
    net = E.build_net(dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **TINY_NET))
    for change, words in [
        (dict(model_type="NCSNpp"), "not supported"),
        (dict(model_type="DhariwalUNet"), "do not match the adm network"),  # DDPM++ weights, ADM class
        (dict(embedding_type="fourier"), "fourier"),
        (dict(NCSN_KWARGS, decoder_type="skip"), "'skip'.*not supported"),  # NCSN++ but for one setting
        (dict(channel_mult_emb=2), "not supported"),
        (dict(num_blocks=2), "do not match"),
    ]:
        write_snapshot(tmp_path / "s.pkl", net, dict(EDM_KWARGS, **change))
        with pytest.raises(SystemExit, match=words) as e:
            C.import_edm_pickle(str(tmp_path / "s.pkl"))
        assert "\n" not in str(e.value)


class Shell:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@pytest.mark.parametrize("payload", [Shell(), {"ema": Shell()}, {"ema": [eval]}])
def test_restricted_unpickler_refuses_non_allow_listed_globals(tmp_path, payload, fake_persistence):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(SystemExit, match="refusing to load global") as e:
        C.import_edm_pickle(str(path))
    assert "\n" not in str(e.value)


def test_missing_or_corrupt_snapshot(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        C.import_edm_pickle(str(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"))
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(SystemExit, match="not a loadable EDM snapshot"):
        C.import_edm_pickle(str(tmp_path / "bad.pkl"))


def test_url_snapshot_offline_names_the_cache_path(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    url = C.EDM_URL + "edm-cifar10-32x32-uncond-vp.pkl"
    with pytest.raises(SystemExit) as e:
        C.main([url, str(tmp_path / "out.pt"), "--cache-dir", str(tmp_path)])
    assert str(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl") in str(e.value) and url in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out.pt").exists()


def test_command_line_converts_without_running_the_snapshot(tmp_path, fake_persistence):
    net = random_net(dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **TINY_NET))
    write_snapshot(tmp_path / "snap.pkl", net, EDM_KWARGS)
    r = run_script([sys.executable, TOOL, str(tmp_path / "snap.pkl"), str(tmp_path / "out.pt")])
    n = sum(t.numel() for t in net.state_dict().values())
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'out.pt'}: ddpmpp at 16px, label_dim 4, {n:,} weights\n"
    assert torch.load(tmp_path / "out.pt", weights_only=True)["net_kwargs"]["arch"] == "ddpmpp"
    r = run_script([sys.executable, TOOL, str(tmp_path / "missing.pkl"), str(tmp_path / "x.pt")])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert str(tmp_path / "missing.pkl") in r.stderr and not (tmp_path / "x.pt").exists()


def _deep_modules(depth):
    state = dict(_parameters={}, _buffers={}, _modules={})
    for _ in range(depth):
        state = dict(_parameters={}, _buffers={}, _modules={"m": FakePersistent("Block", state)})
    return state


@pytest.mark.parametrize(
    "name, snapshot",
    [
        ("bad opcode", b"\x80\x04\xff\x00"),
        ("no state", dict(ema=FakePersistent("EDMPrecond", None))),
        (
            "no img_resolution (KeyError)",
            dict(ema=FakePersistent("EDMPrecond", {"_init_kwargs": {"model_type": "SongUNet"}})),
        ),
        ("init kwargs of the wrong type", dict(ema=FakePersistent("EDMPrecond", {"_init_kwargs": [1, 2]}))),
        ("modules nested past the recursion limit", "deep"),
    ],
)
def test_every_import_failure_is_one_line(tmp_path, fake_persistence, name, snapshot):
    path = tmp_path / "snap.pkl"
    if snapshot == "deep":
        kw = dict(EDM_KWARGS, model_type="SongUNet")
        state = dict(_deep_modules(1100), _init_kwargs=kw)  # deeper than the default limit of 1000
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20000)
        try:
            path.write_bytes(pickle.dumps(dict(ema=FakePersistent("EDMPrecond", state))))
        finally:
            sys.setrecursionlimit(limit)
    else:
        path.write_bytes(snapshot if isinstance(snapshot, bytes) else pickle.dumps(snapshot))
    with pytest.raises(SystemExit) as e:
        C.import_edm_pickle(str(path))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and str(path) in msg, (name, msg)
    assert not os.path.exists(PWNED)


class _Alarm(BaseException):  # not an Exception: import_edm_pickle must not turn it into its one-line error
    pass


def _dag(depth, leaf):
    """A tree of `depth` levels whose two children are one object: depth objects, 2**depth paths."""
    for _ in range(depth):
        leaf = dict(_parameters={}, _buffers={}, _modules={"a": FakePersistent("Block", leaf), "b": None})
        leaf["_modules"]["b"] = leaf["_modules"]["a"]
    return leaf


def test_a_small_pickle_of_shared_children_is_refused_at_once(tmp_path, fake_persistence):
    # 2**40 paths through 40 objects (a few KB): following every path would never end (time doubles per level)
    import signal

    nested = [1]
    for _ in range(40):
        nested = [nested, nested]
    net = random_net(dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **TINY_NET))
    write_snapshot(tmp_path / "kwargs.pkl", net, dict(EDM_KWARGS, extra=nested))  # a real tree, odd kwargs
    (tmp_path / "modules.pkl").write_bytes(
        pickle.dumps(dict(ema=FakePersistent("EDMPrecond", dict(_dag(40, {}), _init_kwargs=EDM_KWARGS))))
    )
    assert (tmp_path / "modules.pkl").stat().st_size < 8000
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(_Alarm()))
    try:
        for name, words in (
            ("modules.pkl", "appears twice: not a tree"),
            ("kwargs.pkl", "init kwargs hold other values"),
        ):
            signal.alarm(30)
            with pytest.raises(SystemExit, match=words) as e:
                C.import_edm_pickle(str(tmp_path / name))
            signal.alarm(0)
            assert "\n" not in str(e.value)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, fake_persistence):
    net = random_net(dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, **TINY_NET))
    write_snapshot(tmp_path / "snap.pkl", net, EDM_KWARGS)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write") as e:
        C.main([str(tmp_path / "snap.pkl"), str(tmp_path / "file" / "out.pt")])
    assert "\n" not in str(e.value)
