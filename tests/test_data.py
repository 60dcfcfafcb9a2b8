"""CIFAR-10 reading, augmentation, the resumable batch loader and the search split."""
from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from approxdarts_np.data.augment import (AugmentConfig, BatchLoader, cutout, iterate_batches,
                                         normalize, random_crop_flip)
from approxdarts_np.data.cifar import (CIFAR10_MEAN, CIFAR10_STD, REQUIRED_FILES, default_data_dir,
                                       load_cifar10, search_split)
from approxdarts_np.errors import UserError
from approxdarts_np_cli.main import app

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-sample"


@pytest.fixture(scope="module")
def sample():
    return load_cifar10()


# --------------------------------------------------------------------------- reading


def test_bundled_sample_shapes_and_labels(sample):
    assert sample.train_x.shape == (5085, 3, 32, 32) and sample.train_x.dtype == np.uint8
    assert sample.test_x.shape == (1017, 3, 32, 32) and sample.test_x.dtype == np.uint8
    assert sample.train_y.shape == (5085,) and sample.train_y.dtype == np.int64
    assert sample.test_y.shape == (1017,) and sample.test_y.dtype == np.int64
    for labels in (sample.train_y, sample.test_y):
        assert labels.min() == 0 and labels.max() == 9
        assert np.all(np.bincount(labels, minlength=10) > 0)
    assert sample.class_names == ("airplane", "automobile", "bird", "cat", "deer",
                                  "dog", "frog", "horse", "ship", "truck")
    assert sample.train_x.flags.c_contiguous and not sample.train_x.flags.writeable
    assert sample.source == default_data_dir()


def test_bundled_sample_is_the_shared_sample_unchanged():
    packaged = default_data_dir()
    assert (packaged / "README.md").is_file()
    if not SHARED_SAMPLE.is_dir():
        pytest.skip("shared sample folder not available")
    for name in REQUIRED_FILES:
        assert (packaged / name).read_bytes() == (SHARED_SAMPLE / name).read_bytes(), name


def test_images_are_the_rows_in_rgb_plane_order(sample):
    # Plain pickle is fine here: the bundled files are trusted.
    with open(default_data_dir() / "data_batch_2", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    row = raw[b"data"][5]
    image = sample.train_x[1017 + 5]
    assert np.array_equal(image[0].ravel(), row[:1024])       # red plane
    assert np.array_equal(image[2, 0, :], row[2048:2048 + 32])  # first blue row
    assert sample.train_y[1017 + 5] == raw[b"labels"][5]


def _copy_sample(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in REQUIRED_FILES:
        shutil.copyfile(default_data_dir() / name, folder / name)
    return folder


def test_folder_and_parent_of_extracted_folder_both_load(tmp_path, sample):
    nested = _copy_sample(tmp_path / "cifar-10-batches-py")
    for where in (nested, tmp_path, str(tmp_path)):
        data = load_cifar10(where)
        assert data.source == nested
        assert np.array_equal(data.train_x, sample.train_x)
        assert np.array_equal(data.test_y, sample.test_y)


def test_missing_files_are_named(tmp_path):
    folder = _copy_sample(tmp_path / "cifar")
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(UserError) as info:
        load_cifar10(folder)
    message = str(info.value)
    assert str(folder) in message and "data_batch_3" in message and "test_batch" in message
    assert "data_batch_1" not in message


def test_empty_or_absent_folder(tmp_path):
    with pytest.raises(UserError, match="holds none"):
        load_cifar10(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")


class _CallsGetcwd:
    """Pickles as a call of os.getcwd: a harmless stand-in for a malicious global."""

    def __reduce__(self):
        return (os.getcwd, ())


_GOOD_DATA = np.zeros((4, 3072), np.uint8)

BROKEN_BATCHES = {
    "garbage": b"this is not a pickle at all",
    "truncated": pickle.dumps({b"data": _GOOD_DATA, b"labels": [0, 1, 2, 3]})[:200],
    "not a dict": pickle.dumps([1, 2, 3]),
    "no labels": pickle.dumps({b"data": _GOOD_DATA}),
    "float data": pickle.dumps({b"data": _GOOD_DATA.astype(np.float32), b"labels": [0, 1, 2, 3]}),
    "wrong row length": pickle.dumps({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}),
    "list data": pickle.dumps({b"data": [[0] * 3072] * 4, b"labels": [0, 1, 2, 3]}),
    "label count": pickle.dumps({b"data": _GOOD_DATA, b"labels": [0, 1, 2]}),
    "label 10": pickle.dumps({b"data": _GOOD_DATA, b"labels": [0, 1, 2, 10]}),
    "label -1": pickle.dumps({b"data": _GOOD_DATA, b"labels": [0, -1, 2, 3]}),
    "string labels": pickle.dumps({b"data": _GOOD_DATA, b"labels": ["a", "b", "c", "d"]}),
    "foreign global": pickle.dumps({b"data": _GOOD_DATA, b"labels": [0, 1, 2, 3], b"x": _CallsGetcwd()}),
}

# Well-formed pickles with content that used to escape as TypeError or OverflowError tracebacks.
MALFORMED_BATCHES = {
    "int key, no data": ({1: 2, b"labels": [0, 1, 2, 3]}, "a key of type int"),
    "int key beside the data": ({b"data": _GOOD_DATA, b"labels": [0, 1, 2, 3], 7: b"x"}, "a key of type int"),
    "tuple key": ({b"data": _GOOD_DATA, b"labels": [0, 1, 2, 3], (1, 2): 0}, "a key of type tuple"),
    "data as bytes and as text": ({b"data": _GOOD_DATA, "data": _GOOD_DATA, b"labels": [0, 1, 2, 3]}, "twice"),
    "5,000-digit label": ({b"data": _GOOD_DATA, b"labels": [0, 1, 2, 10 ** 5000]},
                          "item 3 is an integer of about 5001 digits"),
    "negative 5,000-digit label": ({b"data": _GOOD_DATA, b"labels": [0, -10 ** 5000, 2, 3]},
                                   "item 1 is a negative integer of about 5001 digits"),
    "uint64 label array": ({b"data": _GOOD_DATA, b"labels": np.array([0, 1, 2, 2 ** 64 - 1], np.uint64)},
                           "found 0..18446744073709551615"),
    "uint64 labels in a list": ({b"data": _GOOD_DATA, b"labels": [np.uint64(2 ** 64 - 1)] * 4},
                                "item 0 is 18446744073709551615"),
    "bool label": ({b"data": _GOOD_DATA, b"labels": [0, True, 2, 3]}, "item 1 is bool"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BATCHES))
def test_malformed_batch_content_is_one_clear_error(tmp_path, case):
    content, fragment = MALFORMED_BATCHES[case]
    folder = _copy_sample(tmp_path / "cifar")
    (folder / "data_batch_2").write_bytes(pickle.dumps(content))
    with pytest.raises(UserError) as info:
        load_cifar10(folder)
    message = str(info.value)
    assert message.startswith(str(folder / "data_batch_2")) and fragment in message, message
    assert "\n" not in message and len(message) < 300


def test_uint64_labels_in_range_still_load(tmp_path, sample):
    folder = _copy_sample(tmp_path / "cifar")
    with open(folder / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    batch[b"labels"] = np.array(batch[b"labels"], np.uint64)
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    loaded = load_cifar10(folder)
    assert loaded.test_y.dtype == np.int64 and np.array_equal(loaded.test_y, sample.test_y)


def _write_huge_batch(path: Path, n: int) -> None:
    """A well-formed batch pickle of ``n`` zero images (protocol 3, no framing), written as a sparse file."""
    small = np.full((1001, 3072), 7, np.uint8)
    raw = pickle.dumps({b"data": small, b"labels": [0] * n}, protocol=3)
    shape_old = b"M" + struct.pack("<H", 1001) + b"M" + struct.pack("<H", 3072) + b"\x86"
    shape_new = b"J" + struct.pack("<i", n) + b"M" + struct.pack("<H", 3072) + b"\x86"
    data_old = b"B" + struct.pack("<I", small.size) + small.tobytes()
    assert raw.count(shape_old) == 1 and raw.count(data_old) == 1
    head, tail = raw.replace(shape_old, shape_new).split(data_old)
    with open(path, "wb") as handle:
        handle.write(head + b"B" + struct.pack("<I", n * 3072))
        handle.seek(n * 3072, 1)
        handle.write(tail)


def test_writer_of_huge_batches_writes_a_real_pickle(tmp_path):
    """Test the tester: the patched stream unpickles to n images of zeros with n labels."""
    _write_huge_batch(tmp_path / "batch", 1200)
    with open(tmp_path / "batch", "rb") as handle:
        loaded = pickle.load(handle, encoding="bytes")
    assert loaded[b"data"].shape == (1200, 3072) and not loaded[b"data"].any() and len(loaded[b"labels"]) == 1200


def test_huge_sparse_batch_is_refused_by_its_size(tmp_path):
    """3 GB of (sparse) images: refused before reading, in a process limited to 4 GB of address space."""
    folder = _copy_sample(tmp_path / "cifar")
    _write_huge_batch(folder / "data_batch_3", 1_000_000)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "from approxdarts_np.data.cifar import load_cifar10\n"
            "from approxdarts_np.errors import UserError\n"
            "try:\n"
            "    load_cifar10(sys.argv[1])\n"
            "except UserError as exc:\n"
            "    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith(str(folder / "data_batch_3")), result.stdout
    assert "bytes is more than any CIFAR-10 batch file" in result.stdout, result.stdout


@pytest.mark.parametrize("case", sorted(BROKEN_BATCHES))
def test_broken_batch_names_the_file(tmp_path, case):
    folder = _copy_sample(tmp_path / "cifar")
    (folder / "data_batch_4").write_bytes(BROKEN_BATCHES[case])
    with pytest.raises(UserError) as info:
        load_cifar10(folder)
    assert str(folder / "data_batch_4") in str(info.value)


def test_foreign_global_is_refused_not_called(tmp_path):
    folder = _copy_sample(tmp_path / "cifar")
    (folder / "test_batch").write_bytes(BROKEN_BATCHES["foreign global"])
    with pytest.raises(UserError, match="refusing to load global posix.getcwd"):
        load_cifar10(folder)


@pytest.mark.parametrize("meta", [
    pickle.dumps({b"label_names": [b"a"] * 9}),
    pickle.dumps({b"num_vis": 3072}),
    pickle.dumps("meta"),
])
def test_broken_meta_names_the_file(tmp_path, meta):
    folder = _copy_sample(tmp_path / "cifar")
    (folder / "batches.meta").write_bytes(meta)
    with pytest.raises(UserError, match="batches.meta"):
        load_cifar10(folder)


def _python2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch dict as Python 2's cPickle (protocol 2) with NumPy 1.x wrote the official files:
    `str` values as BINSTRING, the array rebuilt through `numpy.core.multiarray._reconstruct`."""
    def text(value: bytes) -> bytes:
        return b"T" + struct.pack("<I", len(value)) + value

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    n = data.shape[0]
    ops = [b"\x80\x02", b"}", b"(",
           text(b"data"),
           b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", integer(0), b"\x85",
           text(b"b"), b"\x87", b"R",
           b"(", integer(1), integer(n), integer(3072), b"\x86",
           b"cnumpy\ndtype\n", text(b"u1"), integer(0), integer(1), b"\x87", b"R",
           b"(", integer(3), text(b"|"), b"N", b"N", b"N", integer(-1), integer(-1), integer(0),
           b"t", b"b",
           b"\x89", text(data.tobytes()), b"t", b"b",
           text(b"labels"), b"]", b"(", *[integer(v) for v in labels], b"e",
           text(b"batch_label"), text(b"training batch"),
           b"u", b"."]
    return b"".join(ops)


def test_python2_and_protocol2_pickles_load(tmp_path):
    """The official files are Python 2 pickles; re-pickled copies may use protocol 2 from Python 3."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar"
    folder.mkdir()
    shutil.copyfile(default_data_dir() / "batches.meta", folder / "batches.meta")
    expected = []
    for i, name in enumerate(REQUIRED_FILES[:-1]):
        n = 3 + i  # sizes vary: nothing assumes 10,000 (or 1,017) images per batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        if i % 2 == 0:
            raw = _python2_batch_pickle(data, labels)
        else:
            raw = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
            assert b"_codecs" in raw  # Python 3 writes bytes through _codecs.encode here
        (folder / name).write_bytes(raw)
        expected.append((data, labels))
    loaded = load_cifar10(folder)
    train_rows = np.concatenate([d for d, _ in expected[:5]])
    assert np.array_equal(loaded.train_x.reshape(-1, 3072), train_rows)
    assert loaded.train_y.tolist() == sum((lab for _, lab in expected[:5]), [])
    assert np.array_equal(loaded.test_x.reshape(-1, 3072), expected[5][0])


def test_python2_helper_is_a_real_pickle():
    """Test the tester: the hand-written Python 2 stream must unpickle to the same arrays."""
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    loaded = pickle.loads(_python2_batch_pickle(data, [4, 7]), encoding="bytes")
    assert np.array_equal(loaded[b"data"], data) and loaded[b"labels"] == [4, 7]


def test_cli_info(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info"])
    assert result.exit_code == 0, result.output
    assert "5,085 training and 1,017 test images" in result.stdout
    result = runner.invoke(app, ["data", "info", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- augmentation


def _torch_to_tensor_normalize(batch: np.ndarray, mean, std) -> np.ndarray:
    """torchvision's ToTensor + Normalize, written with torch ops on an NCHW uint8 batch."""
    tensor = torch.from_numpy(np.array(batch)).to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return tensor.sub(mean_t).div(std_t).numpy()


def test_normalize_matches_torch_bit_for_bit(sample):
    batch = sample.train_x[:64]
    ours = normalize(batch)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous and ours.shape == batch.shape
    assert np.array_equal(ours, _torch_to_tensor_normalize(batch, CIFAR10_MEAN, CIFAR10_STD))
    # Test the tester: the channels' constants in the wrong order must not pass.
    assert not np.array_equal(ours, _torch_to_tensor_normalize(batch, CIFAR10_MEAN[::-1], CIFAR10_STD))


def _crop_flip_twin(batch, rng, padding, flip):
    """Slow, obvious twin of random_crop_flip drawing the same random numbers."""
    n, _, height, width = batch.shape
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2)) if padding > 0 else np.zeros((n, 2), int)
    mirrored = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    out = np.empty_like(batch)
    for i in range(n):
        padded = np.pad(batch[i], ((0, 0), (padding, padding), (padding, padding)))
        window = padded[:, offsets[i, 0]:offsets[i, 0] + height, offsets[i, 1]:offsets[i, 1] + width]
        out[i] = window[:, :, ::-1] if mirrored[i] else window
    return out


@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       padding=st.integers(0, 4), flip=st.booleans(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.uint8, np.float32]))
def test_random_crop_flip_matches_twin(n, c, h, w, padding, flip, seed, dtype):
    batch = np.random.default_rng(seed).integers(1, 256, (n, c, h, w)).astype(dtype)
    ours = random_crop_flip(batch, np.random.default_rng(seed), padding=padding, flip=flip)
    twin = _crop_flip_twin(batch, np.random.default_rng(seed), padding, flip)
    assert ours.shape == batch.shape and ours.dtype == batch.dtype and ours.flags.c_contiguous
    assert np.array_equal(ours, twin)


def test_crop_flip_twin_catches_a_wrong_offset():
    """Test the tester: a crop shifted by one pixel must differ from the twin."""
    batch = np.random.default_rng(0).integers(1, 256, (3, 3, 8, 8)).astype(np.uint8)
    twin = _crop_flip_twin(batch, np.random.default_rng(1), 2, False)
    shifted = np.roll(random_crop_flip(batch, np.random.default_rng(1), padding=2, flip=False), 1, axis=3)
    assert not np.array_equal(shifted, twin)


def test_flip_only_is_an_exact_mirror_or_identity(sample):
    batch = sample.train_x[:64]
    out = random_crop_flip(batch, np.random.default_rng(5), padding=0, flip=True)
    mirrored = np.array([np.array_equal(o, b[:, :, ::-1]) for o, b in zip(out, batch)])
    same = np.array([np.array_equal(o, b) for o, b in zip(out, batch)])
    assert np.all(mirrored | same)
    assert 10 < mirrored.sum() < 54  # both outcomes occur (p = 1/2, 64 draws)


def test_crop_keeps_shape_and_borders_are_zero_padding():
    batch = np.full((64, 3, 32, 32), 200, np.uint8)
    out = random_crop_flip(batch, np.random.default_rng(7), padding=4, flip=False)
    assert out.shape == batch.shape
    zero_rows = (out[:, 0] == 0).all(axis=2).sum(axis=1)   # fully padded rows per image
    zero_cols = (out[:, 0] == 0).all(axis=1).sum(axis=1)
    assert zero_rows.max() <= 4 and zero_cols.max() <= 4
    assert set(np.unique(out)) <= {0, 200}
    assert len(set(zip(zero_rows, zero_cols))) > 5        # offsets vary across the batch


def _cutout_twin(batch, rng, length):
    """Slow, obvious twin of cutout: DARTS's formula, one image at a time."""
    n, _, height, width = batch.shape
    ys = rng.integers(0, height, size=n)
    xs = rng.integers(0, width, size=n)
    out = batch.copy()
    for i in range(n):
        y1, y2 = np.clip(ys[i] - length // 2, 0, height), np.clip(ys[i] + length // 2, 0, height)
        x1, x2 = np.clip(xs[i] - length // 2, 0, width), np.clip(xs[i] + length // 2, 0, width)
        out[i, :, y1:y2, x1:x2] = 0
    return out


@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       length=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_cutout_matches_twin(n, c, h, w, length, seed):
    batch = np.random.default_rng(seed).uniform(0.5, 2.0, (n, c, h, w)).astype(np.float32)
    ours = cutout(batch, np.random.default_rng(seed), length)
    assert ours.dtype == np.float32 and ours.shape == batch.shape
    assert np.array_equal(ours, _cutout_twin(batch, np.random.default_rng(seed), length))


def test_cutout_zeroes_one_square_of_the_right_size():
    batch = np.ones((256, 3, 32, 32), np.float32)
    out = cutout(batch, np.random.default_rng(11), 16)
    for image in out:
        zero = image == 0
        assert np.array_equal(zero[0], zero[1]) and np.array_equal(zero[0], zero[2])  # all channels
        rows = np.flatnonzero(zero[0].any(axis=1))
        cols = np.flatnonzero(zero[0].any(axis=0))
        # The zeroed pixels form one solid rectangle, at most 16 x 16, clipped at the border.
        assert zero[0].sum() == rows.size * cols.size
        assert rows.size == rows[-1] - rows[0] + 1 and cols.size == cols[-1] - cols[0] + 1
        assert rows.size <= 16 and cols.size <= 16
        # A side shorter than 16 must have been clipped by the image border.
        assert rows.size == 16 or rows[0] == 0 or rows[-1] == 31
        assert cols.size == 16 or cols[0] == 0 or cols[-1] == 31
    full = [(img[0] == 0).sum() == 256 for img in out]
    assert any(full) and not all(full)  # unclipped squares have exactly 16*16 pixels


def test_augmentations_are_deterministic_given_the_generator(sample):
    batch = sample.train_x[:64]
    first = cutout(normalize(random_crop_flip(batch, np.random.default_rng(9))), np.random.default_rng(9), 16)
    again = cutout(normalize(random_crop_flip(batch, np.random.default_rng(9))), np.random.default_rng(9), 16)
    other = cutout(normalize(random_crop_flip(batch, np.random.default_rng(10))), np.random.default_rng(10), 16)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


# --------------------------------------------------------------------------- batch loader


def _toy_data(n=37):
    """Image i is filled with the value i, and its label is i % 10."""
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 3, 4, 4)).copy()
    return x, np.arange(n, dtype=np.int64) % 10


def _image_ids(images):
    """Recover the fill value of each normalised toy image from its red channel."""
    return np.rint((images[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]) * 255).astype(int)


def test_epoch_visits_every_image_once_with_matching_labels():
    x, y = _toy_data()
    loader = BatchLoader(x, y, 8, seed=1)
    assert loader.steps_per_epoch == len(loader) == 5
    seen = []
    for step, images, labels in loader.iter_epoch(0):
        assert images.dtype == np.float32 and images.flags.c_contiguous and labels.dtype == np.int64
        assert images.shape[0] == (8 if step < 4 else 5)
        ids = _image_ids(images)
        assert np.array_equal(labels, ids % 10)
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(37))
    assert seen != list(range(37))


def test_order_depends_on_seed_stream_and_epoch_only():
    x, y = _toy_data()
    base = BatchLoader(x, y, 8, seed=1).order(3)
    assert np.array_equal(base, BatchLoader(x, y, 8, seed=1).order(3))
    assert not np.array_equal(base, BatchLoader(x, y, 8, seed=2).order(3))
    assert not np.array_equal(base, BatchLoader(x, y, 8, seed=1, stream=1).order(3))
    assert not np.array_equal(base, BatchLoader(x, y, 8, seed=1).order(4))
    assert np.array_equal(BatchLoader(x, y, 8, seed=1, shuffle=False).order(3), np.arange(37))


def test_resuming_mid_epoch_is_bit_identical(sample):
    train_idx, _ = search_split(sample.train_x.shape[0])
    config = AugmentConfig(crop_padding=4, flip=True, cutout_length=16)
    kwargs = dict(seed=42, stream=0, indices=train_idx[:300], augment=config)
    full = list(BatchLoader(sample.train_x, sample.train_y, 64, **kwargs).iter_epoch(2))
    resumed = list(BatchLoader(sample.train_x, sample.train_y, 64, **kwargs).iter_epoch(2, start_step=3))
    assert [s for s, _, _ in resumed] == [3, 4]
    for (step_a, x_a, y_a), (step_b, x_b, y_b) in zip(full[3:], resumed):
        assert step_a == step_b and np.array_equal(x_a, x_b) and np.array_equal(y_a, y_b)
    again = BatchLoader(sample.train_x, sample.train_y, 64, **kwargs).batch(2, 1)
    assert np.array_equal(again[0], full[1][1])
    shorthand = list(iterate_batches(sample.train_x, sample.train_y, 64, epoch=2, start_step=4, **kwargs))
    assert np.array_equal(shorthand[0][1], full[4][1])
    # Different steps and epochs get different augmentation.
    assert not np.array_equal(full[0][1], BatchLoader(sample.train_x, sample.train_y, 64,
                                                      **kwargs).batch(3, 0)[0])


def test_no_augmentation_is_plain_normalisation(sample):
    loader = BatchLoader(sample.test_x, sample.test_y, 100, seed=0, shuffle=False)
    images, labels = loader.batch(0, 2)
    assert np.array_equal(images, normalize(sample.test_x[200:300]))
    assert np.array_equal(labels, sample.test_y[200:300])


def test_drop_last_and_bad_settings():
    x, y = _toy_data()
    assert BatchLoader(x, y, 8, seed=0, drop_last=True).steps_per_epoch == 4
    assert BatchLoader(x, y, 37, seed=0, drop_last=True).steps_per_epoch == 1
    with pytest.raises(UserError):
        BatchLoader(x, y, 38, seed=0, drop_last=True)
    with pytest.raises(UserError):
        BatchLoader(x, y, 0, seed=0)
    with pytest.raises(UserError):
        BatchLoader(x, y, 8, seed=-1)
    with pytest.raises(UserError):
        AugmentConfig(cutout_length=-1)
    with pytest.raises(ValueError):
        BatchLoader(x.astype(np.float32), y, 8, seed=0)
    with pytest.raises(ValueError):
        BatchLoader(x, y, 8, seed=0).batch(0, 5)


# --------------------------------------------------------------------------- search split


@pytest.mark.parametrize("n", [2, 7, 5085, 50000])
@pytest.mark.parametrize("seed", [None, 0, 123])
def test_search_split_halves(n, seed):
    train_idx, val_idx = search_split(n, seed)
    assert train_idx.size == n // 2 and val_idx.size == n - n // 2
    assert train_idx.dtype == np.int64 and val_idx.dtype == np.int64
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(n))
    if seed is None:
        assert np.array_equal(train_idx, np.arange(n // 2))
    else:
        assert np.array_equal(train_idx, search_split(n, seed)[0])


def test_seeded_split_differs_from_plain_and_checks_arguments():
    assert not np.array_equal(search_split(5085, 1)[0], search_split(5085)[0])
    for bad in (1, 0, -5):
        with pytest.raises(UserError):
            search_split(bad)
    with pytest.raises(UserError):
        search_split(10, -1)
