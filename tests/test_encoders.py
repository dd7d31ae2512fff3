"""The foundation-encoder registry: every entry builds at full size (on the meta device) with its
declared dimension; each published key layout round-trips (a tiny model saved in that layout loads
back to identical outputs, pooled by the entry's rule); weights are found in files, folders and
Hugging Face cache folders, and a missing file is a clear error; CLAM's resnet50_trunc equals a
truncated torchvision ResNet-50; the registry serves `sgcl extract`, `sgcl eval` and `sgcl pretrain`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from sgcl.models.backbone import file_sha256
from sgcl.models.encoders import (ENCODERS, EncoderWeightsError, build_model, find_weights, load_named_encoder,
                                  load_weights)

torch.set_num_threads(1)

# tiny versions of each entry, built through the same code path (same arch, layout, pooling)
TINY = {
    "uni": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, dim=32),
    "uni2-h": dict(embed_dim=48, depth=2, num_heads=2, img_size=28, dim=48),
    "conch_v1": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, pool_dim=24, pool_heads=2, dim=24),
    "virchow2": dict(embed_dim=48, depth=2, num_heads=2, img_size=28, dim=96),
    "phikon": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, dim=32),
    "phikon-v2": dict(embed_dim=32, depth=2, num_heads=2, img_size=32, dim=32),
    "prov-gigapath": dict(embed_dim=48, depth=2, num_heads=2, img_size=32, dim=48),
    "h-optimus-0": dict(embed_dim=48, depth=2, num_heads=2, img_size=28, dim=48),
}


def tiny(name: str):
    return ENCODERS[name].with_kwargs(**TINY[name])


def seeded(entry, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(entry).eval()
    for p in model.parameters():  # LayerScale/LayerNorm start at constants: make every weight matter
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


# -- independent writers of each published layout (timm keys -> what the model's authors saved) ---------
def to_hf(state: dict, block: dict, prefix: str, dim: int) -> dict:
    """timm ViT keys -> transformers ViTModel / Dinov2Model keys (q, k, v split), as the transformers
    conversion scripts name them."""
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    out = {}
    for key, v in state.items():
        if key in top:
            out[prefix + top[key]] = v
            continue
        _, i, rest = key.split(".", 2)
        module, param = rest.rsplit(".", 1)
        layer = f"{prefix}encoder.layer.{i}."
        if module == "attn.qkv":
            for j, n in enumerate(("query", "key", "value")):
                out[f"{layer}attention.attention.{n}.{param}"] = v[j * dim:(j + 1) * dim]
        else:
            out[layer + block[module] + "." + ("lambda1" if param == "gamma" else param)] = v
    return out


def published(name: str, state: dict, dim: int, variant: str = "") -> dict:
    state = {k: v.clone() for k, v in state.items()}
    if name == "phikon":
        out = to_hf(state, {"norm1": "layernorm_before", "attn.proj": "attention.output.dense",
                            "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"},
                    variant, dim)
        out[f"{variant}pooler.dense.weight"], out[f"{variant}pooler.dense.bias"] = torch.randn(dim, dim), torch.randn(dim)
        return out
    if name == "phikon-v2":
        out = to_hf(state, {"norm1": "norm1", "attn.proj": "attention.output.dense", "ls1": "layer_scale1",
                            "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "ls2": "layer_scale2"}, "", dim)
        out["embeddings.mask_token"] = torch.zeros(1, dim)
        return out
    if name == "conch_v1":
        out = {"visual." + k: v for k, v in state.items()}
        out.update({"visual.proj_contrast": torch.randn(24, 24), "visual.attn_pool_caption.query": torch.randn(4, 32),
                    "visual.ln_caption.weight": torch.ones(32), "text.token_embedding.weight": torch.randn(10, 32),
                    "logit_scale": torch.tensor(2.0)})
        return out
    return state  # timm layout (UNI, UNI2-h, Virchow2, GigaPath, H-optimus-0)


def save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def reference_pool(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each model card's pooling, written out from the tokens."""
    tokens = model.forward_features(x)
    if name == "virchow2":
        return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], -1)  # 1 class + 4 registers
    if name == "conch_v1":  # CoCa's AttentionalPooler: sequence-first MHA over ln_k(tokens), query ln_q(query)
        pool = model.attn_pool_contrast
        kv = pool.ln_k(tokens).transpose(0, 1)
        q = pool.ln_q(pool.query).unsqueeze(1).expand(-1, x.shape[0], -1)
        mha = nn.MultiheadAttention(24, 2, kdim=32, vdim=32).eval()
        mha.load_state_dict(pool.attn.state_dict())
        out = mha(q, kv, kv, need_weights=False)[0].transpose(0, 1)[:, 0]
        return model.ln_contrast(out)
    return tokens[:, 0]


# -- tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_entry_builds_full_size_with_its_declared_dimension(name):
    entry = ENCODERS[name]
    with torch.device("meta"):
        model = build_model(entry)
        out = model(torch.zeros(2, 3, entry.input_size, entry.input_size))
    assert model.num_features == entry.dim and tuple(out.shape) == (2, entry.dim)
    assert entry.pooling in ("cls", "cls+mean", "attn_pool", "avg") and entry.files and entry.hf_repo


def test_architectures_match_the_model_cards():
    with torch.device("meta"):
        phikon, h0, uni2 = build_model(ENCODERS["phikon"]), build_model(ENCODERS["h-optimus-0"]), build_model(ENCODERS["uni2-h"])
        virchow = build_model(ENCODERS["virchow2"])
    assert phikon.norm.eps == 1e-12 and phikon.blocks[0].norm1.eps == 1e-12  # transformers ViT layer_norm_eps
    assert h0.num_prefix_tokens == 5 and uni2.num_prefix_tokens == 9 and virchow.num_prefix_tokens == 5
    assert tuple(virchow.pos_embed.shape) == (1, 261, 1280) and tuple(uni2.pos_embed.shape) == (1, 256, 1536)
    # parameter counts of the model cards / papers (millions)
    with torch.device("meta"):
        sizes = {n: sum(p.numel() for p in build_model(ENCODERS[n]).parameters()) / 1e6
                 for n in ("uni", "uni2-h", "virchow2", "prov-gigapath", "h-optimus-0", "phikon")}
    for name, published_m in {"uni": 303, "uni2-h": 681, "virchow2": 631, "prov-gigapath": 1134,
                              "h-optimus-0": 1134, "phikon": 86}.items():
        assert abs(sizes[name] - published_m) < 2, (name, sizes[name])


@pytest.mark.parametrize("name", list(TINY))
def test_published_layout_loads_to_identical_outputs(name, tmp_path):
    entry = tiny(name)
    original = seeded(entry, 0)
    suffix = ".safetensors" if name in ("phikon-v2", "virchow2") else ".bin"
    path = tmp_path / f"weights{suffix}"
    save(published(name, original.state_dict(), TINY[name].get("embed_dim", 32)), path)
    fresh = seeded(entry, 1)
    x = torch.randn(3, 3, entry.input_size, entry.input_size)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), original(x))
        info = load_weights(fresh, entry, path)
        out = fresh(x)
        assert out.shape == (3, entry.dim)
        assert torch.equal(out, original(x))
        torch.testing.assert_close(out, reference_pool(name, original, x), rtol=1e-5, atol=1e-5)
    assert info["sha256"] == file_sha256(path) and info["weights"] == str(path)
    for key, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_phikon_keys_with_the_vit_prefix_and_the_converters_drop_extras(tmp_path):
    entry = tiny("phikon")
    original = seeded(entry, 0)
    save(published("phikon", original.state_dict(), 32, variant="vit."), tmp_path / "pytorch_model.bin")
    fresh = seeded(entry, 1)
    info = load_weights(fresh, entry, tmp_path)  # a plain folder holding the expected file
    assert info["unexpected_keys"] == [] and info["weights"].endswith("pytorch_model.bin")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), original(x))


def test_position_embeddings_of_another_grid_are_resampled(tmp_path):
    entry = tiny("uni")
    state = seeded(entry.with_kwargs(img_size=48), 0).state_dict()
    torch.save(state, tmp_path / "w.pth")
    info = load_weights(seeded(entry, 1), entry, tmp_path / "w.pth")
    assert info["notes"] and "(1, 10, 32) -> (1, 5, 32)" in info["notes"][0]


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    torch.save(seeded(tiny("uni"), 0).state_dict(), tmp_path / "uni.bin")
    with pytest.raises(EncoderWeightsError, match=r"uni\.bin: not a checkpoint of phikon .*are not in the model"):
        load_weights(seeded(tiny("phikon"), 0), tiny("phikon"), tmp_path / "uni.bin")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EncoderWeightsError, match="not a weights file"):
        find_weights(ENCODERS["uni"], tmp_path / "notes.txt")


def test_weights_are_found_in_hugging_face_cache_folders(tmp_path, monkeypatch):
    entry = ENCODERS["phikon"]
    repo = tmp_path / "hub" / "models--owkin--phikon"
    old, new = repo / "snapshots" / "aaa", repo / "snapshots" / "bbb"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
    (old / "pytorch_model.bin").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    expected = old / "pytorch_model.bin"  # refs/main's snapshot, the first published file name
    for where in (tmp_path / "hub", repo, old):
        assert find_weights(entry, where) == expected
    assert find_weights(entry, new) == new / "model.safetensors"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_weights(entry, None) == expected  # no path: the default caches


def test_missing_weights_name_the_file_and_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(EncoderWeightsError) as exc:
        find_weights(ENCODERS["uni"], None)
    msg = str(exc.value)
    assert "pytorch_model.bin" in msg and str(tmp_path / "hub") in msg and str(tmp_path / "torch") in msg
    assert "models--MahmoodLab--UNI" in msg and "MahmoodLab/UNI" in msg and "--weights" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderWeightsError, match=r"conch_v1: no weights found; expected pytorch_model.bin .*empty"):
        find_weights(ENCODERS["conch_v1"], empty)
    with pytest.raises(EncoderWeightsError, match=r"phikon-v2: no such file or folder: .*nowhere \(expected phikon-v2 weights, files: model.safetensors"):
        load_named_encoder("phikon-v2", tmp_path / "nowhere")


def test_resnet50_trunc_equals_a_truncated_torchvision_resnet50(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    for m in tv.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}  # an old .pth
    torch.save(state, tmp_path / "resnet50-19c8e357.pth")
    model, info = load_named_encoder("resnet50_trunc", tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        expected = torch.flatten(nn.AdaptiveAvgPool2d(1)(y), 1)
        out = model.eval()(x)
    assert out.shape == (2, 1024) and info["pooling"] == "avg" and info["num_features"] == 1024
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# -- the commands -------------------------------------------------------------------------------------
def _patch_file(path, n: int, seed: int = 0):
    from preprocessing.h5format import write_patch_file

    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 255, (n, 40, 40, 3), dtype=np.uint8)
    write_patch_file(path, patches, np.arange(2 * n).reshape(n, 2) * 40, np.arange(2 * n).reshape(n, 2))
    return patches


def test_extract_list_prints_every_entry(capsys):
    from evaluation.extract import main

    assert main(["--encoder", "list"]) == 0
    out = capsys.readouterr().out
    for name, entry in ENCODERS.items():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert entry.arch in line and str(entry.dim) in line and entry.pooling in line and entry.files[0] in line
        assert f" {entry.trident_name} " in line


def test_trident_and_clam_names_select_the_same_entries():
    from sgcl.models.encoders import canonical_name, get_entry, trident_folder_name

    for alias, name in {"uni_v1": "uni", "uni_v2": "uni2-h", "phikon_v2": "phikon-v2", "gigapath": "prov-gigapath",
                        "hoptimus0": "h-optimus-0", "conch_v1": "conch_v1"}.items():
        assert canonical_name(alias) == name and get_entry(alias) is ENCODERS[name]
        assert trident_folder_name(name) == alias  # TRIDENT's features_<name>/ folder
    assert canonical_name("resnet50") == "resnet50"  # timm's full ResNet-50, not TRIDENT's truncated one
    assert trident_folder_name("resnet50_trunc") == "resnet50" and trident_folder_name("vit_small") == "vit_small"


def test_extract_with_a_named_encoder_end_to_end(tmp_path, monkeypatch, capsys):
    from evaluation.embedding import BatchTransform
    from evaluation.extract import main

    entry = tiny("phikon")
    monkeypatch.setitem(ENCODERS, "phikon", entry)  # the test hook: a tiny phikon through the same code
    original = seeded(entry, 0)
    weights = tmp_path / "phikon" / "pytorch_model.bin"
    weights.parent.mkdir()
    save(published("phikon", original.state_dict(), 32), weights)
    inputs = tmp_path / "in"
    inputs.mkdir()
    patches = _patch_file(inputs / "s1.h5", 6)
    out = tmp_path / "out"
    args = ["--inputs", str(inputs), "--out", str(out), "--encoder", "phikon", "num_workers=0", "progress=false"]
    assert main([*args, "--weights", str(weights.parent)]) == 0
    with h5py.File(out / "h5_files" / "s1.h5", "r") as f:
        feats, attrs = f["features"][:], dict(f.attrs)
    assert attrs["encoder"] == "phikon" and attrs["pooling"] == "cls" and attrs["input_size"] == 32
    assert attrs["weights_sha256"] == file_sha256(weights) and feats.shape == (6, 32)
    with torch.no_grad():  # the entry's preprocessing (resize to 32, ImageNet mean/std) + the loaded model
        expected = original(BatchTransform(32, entry.mean, entry.std, "bilinear")(list(patches))).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    # same weights: resumed (skipped); other weights: recomputed
    assert main([*args, "--weights", str(weights)]) == 0
    assert "'skipped': 1" in capsys.readouterr().out
    other = tmp_path / "other.bin"
    save(published("phikon", seeded(entry, 2).state_dict(), 32), other)
    assert main([*args, "--weights", str(other)]) == 0
    assert "'done': 1" in capsys.readouterr().out
    with h5py.File(out / "h5_files" / "s1.h5", "r") as f:
        assert f.attrs["weights_sha256"] == file_sha256(other) and not np.allclose(f["features"][:], feats)
    # TRIDENT's name and layout: features_phikon/ (TRIDENT's folder for its phikon), same features
    tri_args = ["--inputs", str(inputs), "--out", str(tmp_path / "tri"), "--encoder", "phikon", "num_workers=0",
                "progress=false", "--weights", str(weights), "--layout", "trident"]
    assert main(tri_args) == 0
    with h5py.File(tmp_path / "tri" / "features_phikon" / "s1.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][:], feats)
    # a missing file: exit 2 with the expected file name, not a download
    assert main([*args, "--weights", str(tmp_path / "in")]) == 2
    err = capsys.readouterr().err
    assert "no weights found; expected pytorch_model.bin, model.safetensors" in err and str(tmp_path / "in") in err


def test_eval_features_with_a_named_encoder(tmp_path, monkeypatch):
    import cv2

    from evaluation.cli import EvalConfig, load_feature_set
    from sgcl.config import load_config

    entry = tiny("virchow2")
    monkeypatch.setitem(ENCODERS, "virchow2", entry)
    weights = tmp_path / "virchow2.safetensors"
    save(seeded(entry, 0).state_dict(), weights)
    rng = np.random.default_rng(0)
    for c in ("tumor", "stroma"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "data" / c / f"{i}.png"), rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))
    cfg = load_config(EvalConfig, None, [f"data.root={tmp_path / 'data'}", "encoder.spec=virchow2",
                                         f"encoder.weights={weights}", "encoder.num_workers=0", "progress=false",
                                         f"out_dir={tmp_path / 'eval'}"])
    fs = load_feature_set(cfg)
    assert fs.features.shape == (6, 96)
    assert fs.meta["registry"] == "virchow2" and fs.meta["pooling"] == "cls+mean"
    assert fs.meta["weights_sha256"] == file_sha256(weights) and fs.meta["mean"] == list(entry.mean)


def test_pretrain_starts_from_the_encoders_weights_and_exports_it(tmp_path, monkeypatch):
    from evaluation.embedding import load_encoder
    from sgcl.config import load_config
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    from conftest import REPO

    entry = tiny("conch_v1").with_kwargs(dynamic_img_size=True)
    monkeypatch.setitem(ENCODERS, "conch_v1", entry)
    original = seeded(entry, 0)
    weights = tmp_path / "pytorch_model.bin"
    save(published("conch_v1", original.state_dict(), 32), weights)
    (tmp_path / "tiles").mkdir()
    for s in range(2):
        _patch_file(tmp_path / "tiles" / f"s{s}.h5", 12, s)
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny_cpu.yaml", [
        f"data.h5_dir={tmp_path / 'tiles'}", f"train.out_dir={tmp_path / 'run'}", "train.progress=false",
        "data.batch_size=8", "aug.global_size=32", "aug.local_size=16", "model.backbone=conch_v1",
        f"model.init_weights={weights}", "method.name=moco_v2", "train.max_steps=1"])
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        backbone = trainer.method.backbone
        for key, value in original.state_dict().items():
            assert torch.equal(backbone.state_dict()[key], value), key
        trainer.export()
    finally:
        trainer.close()
    enc = load_encoder(str(tmp_path / "run" / "export"))  # the export names the registry entry
    assert enc.info["encoder"] == "conch_v1" and enc.mean == entry.mean and enc.input_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.model(x), original(x))
    with pytest.raises(EncoderWeightsError, match=r"conch_v1: no such file or folder: .*missing\.bin \(expected conch_v1 weights"):
        bad = load_config(PretrainConfig, None, [f"data.h5_dir={tmp_path / 'tiles'}", "model.backbone=conch_v1",
                                                 f"model.init_weights={tmp_path / 'missing.bin'}",
                                                 f"train.out_dir={tmp_path / 'bad'}", "train.device=cpu"])
        Trainer(bad).setup()
