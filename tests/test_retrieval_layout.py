"""Shards that survive a changed input list: items placed by a hash of their id, so removing or adding items
rewrites only the shards that hold them and encodes only new items; damaged shards found on resume; version-1
directories still searchable and migrated without re-encoding; the storage helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import cnclip_vision
from cnclip_vision.errors import CNClipError
from cnclip_vision.retrieval import (
    EmbeddingIndex,
    extract_image_embeddings,
    item_hash,
    load_embeddings,
    num_shards_for,
    save_embeddings,
    shard_of,
    store,
)
from cnclip_vision.retrieval.extract import model_info


@pytest.fixture(scope="module")
def model():
    return cnclip_vision.load("toy-tiny", device="cpu")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_images")
    rng = np.random.default_rng(1)
    out = []
    for i in range(45):
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        out.append(str(path))
    return out


class Counting:
    """Counts the images the model encodes."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        real = model.encode_image

        def encode_image(x, **kw):
            self.n += len(x)
            return real(x, **kw)

        monkeypatch.setattr(model, "encode_image", encode_image)


def _extract(model, inputs, out, **kw):
    return extract_image_embeddings(model, inputs, out, shard_size=8, batch_size=4, num_workers=0, progress=False, **kw)


def _files(out):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.safetensors")}


def _shard(item_id: str, num_shards: int) -> str:
    return store.shard_name(shard_of(item_hash(item_id), num_shards), num_shards)


def test_removing_and_adding_items_touches_only_their_shards(model, paths, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    first = _extract(model, paths[:40], out)
    assert first["num_shards"] == 8 and first["num_encoded"] == 40
    before = _files(out)
    counter = Counting(model, monkeypatch)

    removed = [paths[3], paths[17], paths[29]]
    kept = [p for p in paths[:40] if p not in removed]
    summary = _extract(model, kept, out)
    touched = {_shard(p, 8) for p in removed}
    assert counter.n == 0 and summary["num_encoded"] == 0  # removal encodes nothing
    assert summary["rewritten_shards"] == len(touched) and summary["reused_shards"] == 8 - len(touched)
    after = _files(out)
    assert {n for n in after if after[n] != before[n]} == touched  # every other shard file untouched
    ids, emb = load_embeddings(out)
    fresh_ids, fresh = load_embeddings(_extract(model, kept, tmp_path / "fresh")["out_dir"])
    assert ids == fresh_ids and (emb - fresh).abs().max() <= 1e-6  # copied rows vs rows encoded in other batches

    added = paths[40:42]
    counter.n = 0
    summary = _extract(model, kept + added, out)
    assert (
        counter.n == 2
        and summary["num_encoded"] == 2
        and summary["num_copied"] == sum(1 for p in kept if _shard(p, 8) in {_shard(a, 8) for a in added})
    )
    assert summary["rewritten_shards"] == len({_shard(p, 8) for p in added})
    assert sorted(load_embeddings(out)[0]) == sorted(kept + added)


def test_growth_past_the_layout_copies_into_the_new_shards(model, paths, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    _extract(model, paths[:10], out)  # 10 / 8 -> 2 shards
    counter = Counting(model, monkeypatch)
    summary = _extract(model, paths, out)  # 45 items: 2 shards would average 22.5 > 2 x 8: a new layout of 8
    assert summary["num_shards"] == 8 and counter.n == 35 and summary["num_copied"] == 10
    assert sorted(p.name for p in out.glob("shard-*")) == [store.shard_name(s, 8) for s in range(8)]  # old layout gone


def test_damaged_shards_are_redone_on_resume(model, paths, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    _extract(model, paths[:40], out)
    reference = load_embeddings(out)
    names = sorted(p.name for p in out.glob("shard-*"))
    flipped, cut, garbage = out / names[0], out / names[1], out / names[2]
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x40  # one bit of one embedding
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:200])
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CNClipError, match="damaged"):  # reading with verify notices the flipped bit
        load_embeddings(out, verify=True)
    damaged_items = sum(1 for p in paths[:40] if _shard(p, 8) in names[:3])
    counter = Counting(model, monkeypatch)
    summary = _extract(model, paths[:40], out)
    assert summary["reused_shards"] == 5 and counter.n == damaged_items == summary["num_encoded"]
    ids, emb = load_embeddings(out, verify=True)
    assert ids == reference[0] and torch.equal(emb, reference[1])
    # without verification only headers and sizes are checked: the flipped bit goes unnoticed
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x40
    flipped.write_bytes(bytes(data))
    counter.n = 0
    assert _extract(model, paths[:40], out, verify=False)["reused_shards"] == 8 and counter.n == 0


def _write_v1(model, paths, out, shard_size=16):
    """A directory as version 1 wrote it: shard i = inputs [i*n, (i+1)*n), no checksums."""
    info = model_info(model)
    ids = [p.rsplit("/", 1)[-1] for p in paths]
    from cnclip_vision.models.encode import encode_images

    emb = encode_images(model, paths).numpy()
    key = {
        "format": "cnclip-embeddings",
        "version": 1,
        "modality": "image",
        "model_fingerprint": info["fingerprint"],
        "dtype": "float32",
        "dim": emb.shape[1],
        "normalized": True,
    }
    out.mkdir()
    shards = []
    for i, start in enumerate(range(0, len(ids), shard_size)):
        stop = min(len(ids), start + shard_size)
        meta = {**key, "start": start, "stop": stop, "range_digest": "x", "ids": ids[start:stop], "failures": []}
        save_file(
            {"embeddings": emb[start:stop]},
            str(out / f"shard-{i:05d}.safetensors"),
            metadata={"cnclip_embeddings": json.dumps(meta)},
        )
        shards.append({"file": f"shard-{i:05d}.safetensors", "start": start, "stop": stop, "count": stop - start})
    (out / "ids.txt").write_text("".join(i + "\n" for i in ids))
    manifest = {
        **{k: key[k] for k in ("format", "version", "modality")},
        "source": "x",
        "model": info,
        "dim": key["dim"],
        "dtype": "float32",
        "normalized": True,
        "shard_size": shard_size,
        "num_inputs": len(ids),
        "num_embedded": len(ids),
        "num_failed": 0,
        "ids_file": "ids.txt",
        "shards": shards,
        "failures": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return ids, emb


def test_version1_directory_searches_and_migrates_without_encoding(model, paths, tmp_path, monkeypatch):
    out = tmp_path / "old"
    ids, emb = _write_v1(model, paths[:40], out)
    index = EmbeddingIndex.from_dir(out)
    assert index.ids == ids and index.search(torch.from_numpy(emb[7:8]), 1)[1].item() == 7
    counter = Counting(model, monkeypatch)
    (tmp_path / "imgs").mkdir()
    for p in paths[:40]:  # the same ids (file names relative to the folder)
        (tmp_path / "imgs" / p.rsplit("/", 1)[-1]).symlink_to(p)
    summary = _extract(model, tmp_path / "imgs", out)
    assert (counter.n, summary["num_copied"], summary["version"]) == (0, 40, 2)
    assert not list(out.glob("shard-0000?.safetensors"))  # the version-1 files are gone once migrated
    new_ids, new_emb = load_embeddings(out)
    order = [ids.index(i) for i in new_ids]
    assert sorted(new_ids) == sorted(ids) and np.array_equal(new_emb.numpy(), emb[order])


def test_num_shards_rule_and_hysteresis():
    assert [num_shards_for(n, 10) for n in (1, 10, 11, 20, 21, 1000)] == [1, 1, 2, 2, 4, 128]
    assert num_shards_for(150, 10, previous=16) == 16  # 9.4 per shard: kept
    assert num_shards_for(330, 10, previous=16) == 64  # 20.6 > 2 x 10: a new layout
    assert num_shards_for(30, 10, previous=16) == 4  # 1.9 < 10 / 4: a new layout
    with pytest.raises(ValueError, match="power of two"):
        shard_of(123, 3)
    hashes = store.item_hashes([f"id{i}" for i in range(4000)])
    counts = np.bincount(shard_of(hashes, 8), minlength=8)
    assert counts.min() > 400  # the hash spreads items evenly (expected 500 each)
    assert shard_of(item_hash("a/b.jpg"), 16) == shard_of(np.array([item_hash("a/b.jpg")], np.uint64), 16)[0]


def test_save_embeddings_lazy_ids_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16))
    ids = [f"照片/{i}.jpg" for i in range(300)]
    manifest = save_embeddings(tmp_path / "e", ids, x * 3, shard_size=50, dtype="float16")
    assert manifest["layout"]["num_shards"] == 8 and manifest["num_embedded"] == 300
    got_ids, got = load_embeddings(tmp_path / "e")
    lazy = store.LazyIds(tmp_path / "e" / "ids.txt", expected=300)
    assert list(lazy) == got_ids and lazy[-1] == got_ids[-1] and len(lazy) == 300 and lazy[2:4] == got_ids[2:4]
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True))[[ids.index(i) for i in got_ids]]
    assert got.dtype == torch.float16 and np.abs(got.float().numpy() - expected).max() < 1e-3
    with pytest.raises(CNClipError, match="duplicate"):
        save_embeddings(tmp_path / "f", ["a", "a"], x[:2])
    with pytest.raises(ValueError, match=r"\[len\(ids\), D\]"):
        save_embeddings(tmp_path / "f", ["a"], x[:2])
    with pytest.raises(store.ShardError, match="truncated"):
        store.read_shard_meta(_truncated(tmp_path / "e"))


def _truncated(directory):
    path = next(directory.glob("shard-*"))
    path.write_bytes(path.read_bytes()[:-1])
    return path
