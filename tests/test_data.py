"""The tf.data pipeline: discovery, splits, decoding of every format and mode, class weights."""
from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from conftest import tree_with_sources
from trainer import config as config_lib, data
from trainer.errors import DataError

GRADIENT = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _rgb(a):
    return np.stack([a, 255 - a, a // 2], -1).astype(np.uint8)


# (name, image, format, expected [0,1] RGB array at full size or None when lossy)
FORMATS = [
    ("png-grayscale", Image.fromarray(GRADIENT), "PNG", np.repeat(GRADIENT[..., None], 3, -1) / 255),
    ("png-rgb", Image.fromarray(_rgb(GRADIENT)), "PNG", _rgb(GRADIENT) / 255),
    ("png-rgba", Image.fromarray(np.dstack([_rgb(GRADIENT), GRADIENT])), "PNG", _rgb(GRADIENT) / 255),
    ("png-palette", Image.fromarray(GRADIENT).convert("P"), "PNG",
     np.repeat(GRADIENT[..., None], 3, -1) / 255),
    ("png-16bit", Image.fromarray(GRADIENT.astype(np.uint16) * 257), "PNG",
     np.repeat(GRADIENT[..., None], 3, -1) / 255),
    ("png-gray-alpha", Image.fromarray(np.dstack([GRADIENT, 255 - GRADIENT]), "LA"), "PNG",
     np.repeat(GRADIENT[..., None], 3, -1) / 255),
    ("jpeg-grayscale", Image.fromarray(GRADIENT), "JPEG", None),
    ("jpeg-rgb", Image.fromarray(_rgb(GRADIENT)), "JPEG", None),
    ("bmp-rgb", Image.fromarray(_rgb(GRADIENT)), "BMP", _rgb(GRADIENT) / 255),
    ("bmp-grayscale", Image.fromarray(GRADIENT), "BMP", np.repeat(GRADIENT[..., None], 3, -1) / 255),
    ("gif-palette", Image.fromarray(GRADIENT).convert("P"), "GIF",
     np.repeat(GRADIENT[..., None], 3, -1) / 255),
]


@pytest.mark.parametrize("name, image, fmt, expected", FORMATS, ids=[f[0] for f in FORMATS])
def test_decode_every_format_and_mode(name, image, fmt, expected):
    decoded = data.decode_image(_encode(image, fmt), 32).numpy()
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.float32
    assert 0.0 <= decoded.min() and decoded.max() <= 1.0
    if expected is not None:
        np.testing.assert_allclose(decoded, expected, atol=1e-5)
    else:  # lossy JPEG: matches Pillow's decoding of the same bytes
        reference = Image.open(io.BytesIO(_encode(image, fmt))).convert("RGB")
        assert np.abs(decoded - np.asarray(reference, np.float32) / 255).mean() < 0.01


def test_animated_gif_gives_its_first_frame():
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)).convert("P") for v in (200, 10)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    decoded = data.decode_image(buf.getvalue(), 8).numpy()
    np.testing.assert_allclose(decoded, 200 / 255, atol=1e-5)


@pytest.mark.parametrize("size", [50, 100, 224])
def test_jpeg_shrunk_in_the_decoder_matches_a_full_decode(size):
    import tensorflow as tf
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (28, 28)), np.ones((8, 8))).astype(np.uint8)
    raw = _encode(Image.fromarray(smooth), "JPEG")  # 224x224
    ours = data.decode_image(raw, size).numpy()
    full = tf.image.resize(tf.io.decode_jpeg(raw, channels=3), [size, size], method="area") / 255
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - full.numpy()).mean() < 0.02


def _area_weights(n_in, n_out):
    """[n_out, n_in]: the share of each input pixel inside each output pixel's footprint."""
    edges = np.arange(n_out + 1) * n_in / n_out
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) / (n_in / n_out)


def _reference_resize(a, size):
    """The documented resize, computed independently: a shrink is the area average (numpy),
    taken from 4 x 4 block means first for a grayscale image with sides divisible by 4 and
    exactly 4x or at least 16x the size; an enlargement of either side is Pillow's BILINEAR
    resize of the float pixels (the same antialiased triangle filter), one channel at a time;
    images at size are kept."""
    h, w = a.shape[:2]
    if (h, w) == (size, size):
        return a
    if h >= size and w >= size:
        if _takes_block_means(a.shape, size):
            a = a.reshape(h // 4, 4, w // 4, 4, 1).mean(axis=(1, 3))
            h, w = h // 4, w // 4
        return np.einsum("ih,hwc,jw->ijc", _area_weights(h, size), a, _area_weights(w, size))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c]), "F").resize(
        (size, size), Image.BILINEAR)) for c in range(a.shape[-1])], axis=-1)


def _takes_block_means(shape, size):
    h, w, channels = shape
    return (channels == 1 and h % 4 == 0 and w % 4 == 0
            and ((h, w) == (4 * size, 4 * size) or min(h, w) >= 16 * size))


# (mode, height, width, size): shrinks by whole factors (64 -> 16, 48x96 -> 24) and others
# (70x67 -> 16, 120 -> 10, 60x130 -> 10), kept as is (16), enlargements (20 -> 50, 28 -> 40,
# 16x12 -> 16) and one side each way (40x12 -> 16); RGB and RGBA become 3 channels.
# Grayscale 64 -> 16 (exactly 4x), 176 -> 10 and 192x320 -> 12 (16x or more) take 4 x 4
# block means first.
RESIZES = [("L", 64, 64, 16), ("RGB", 64, 64, 16), ("L", 70, 67, 16), ("RGBA", 33, 33, 8),
           ("L", 48, 96, 24), ("L", 16, 16, 16), ("L", 20, 20, 50), ("RGB", 24, 24, 20),
           ("L", 120, 120, 10), ("L", 60, 130, 10), ("L", 40, 12, 16), ("L", 176, 176, 10),
           ("L", 192, 320, 12), ("RGB", 192, 192, 12), ("RGB", 28, 28, 40), ("L", 16, 12, 16)]


@pytest.mark.parametrize("mode, height, width, size", RESIZES)
def test_cached_pixels_are_rounded_antialiased_shrinks(mode, height, width, size):
    rng = np.random.default_rng(height * width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert(mode)
    raw = _encode(image, "PNG")
    pixels = data.decode_pixels(raw, size).numpy()
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
    exact = _reference_resize(np.asarray(image, np.float32).reshape(height, width, -1), size)
    exact = np.repeat(exact, 3, -1) if exact.shape[-1] == 1 else exact[..., :3]
    assert np.abs(pixels - exact).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(data.decode_image(raw, size).numpy(), pixels / np.float32(255))


@pytest.mark.parametrize("side, size", [(128, 32), (128, 16), (1024, 50)])
def test_block_means_of_white_stay_white(side, size):
    """4 x 4 sums of 255 fill the 16-bit lanes they are added in most; none may carry over."""
    white = _encode(Image.fromarray(np.full((side, side), 255, np.uint8)), "PNG")
    assert (data.decode_pixels(white, size).numpy() == 255).all()


def test_block_means_stay_within_a_grey_level_of_area():
    """An X-ray-like image (smooth body plus noise) shrunk 16.8x: averaging 4 x 4 block means
    instead of the pixels themselves moves no pixel by more than a grey level."""
    import tensorflow as tf
    yy, xx = np.mgrid[0:840, 0:840] / 840
    body = 60 + 150 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.08)
    noisy = body + np.random.default_rng(0).normal(0, 12, body.shape)
    image = np.clip(noisy, 0, 255).astype(np.uint8)
    ours = data.decode_pixels(_encode(Image.fromarray(image), "PNG"), 50).numpy()[..., 0]
    area = tf.image.resize(image[..., None], [50, 50], method="area").numpy()[..., 0]
    assert np.abs(ours - np.round(area)).max() <= 1


@pytest.mark.parametrize("interpolation", ["bilinear", "area", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [20, 100])
def test_every_interpolation_saturates_into_8_bits(interpolation, size):
    """A black/white edge: bicubic rings below 0 and above 255; clipped, every row still rises
    monotonically from 0 to 255 (a value wrapped around 8 bits would break that)."""
    edge = np.zeros((64, 64), np.uint8)
    edge[:, 32:] = 255
    pixels = data.decode_pixels(_encode(Image.fromarray(edge), "PNG"), size, interpolation).numpy()
    assert pixels.dtype == np.uint8
    rows = pixels[..., 0].astype(int)
    assert (np.diff(rows, axis=1) >= 0).all()
    assert (rows[:, 0] == 0).all() and (rows[:, -1] == 255).all()


def test_resize_to_configured_size():
    decoded = data.decode_image(_encode(Image.fromarray(GRADIENT), "PNG"), 50).numpy()
    assert decoded.shape == (50, 50, 3)


def test_class_folders_match_case_insensitively(tmp_path):
    for name in ("covid-19", "NORMAL", "VIRAL PNEUMONIA", "extra"):
        (tmp_path / name).mkdir()
    folders = data.find_class_dirs(str(tmp_path), list(config_lib.TUTORIAL_CLASSES))
    assert [Path(f).name for f in folders] == ["covid-19", "NORMAL", "VIRAL PNEUMONIA"]


@pytest.mark.parametrize("folders, files, message", [
    (["COVID-19", "NORMAL"], {}, "no folder for class 'Viral Pneumonia'"),
    (["COVID-19", "NORMAL", "Viral Pneumonia"], {"NORMAL": []}, "class folder holds no images"),
    ([], {}, "no folder for class 'COVID-19' (found: no folders)"),
])
def test_bad_trees(tmp_path, folders, files, message):
    for name in folders:
        (tmp_path / name).mkdir()
        for i in range(files.get(name, [1])[0] if files.get(name, [1]) else 0):
            Image.fromarray(GRADIENT).save(tmp_path / name / f"{i}.png")
    with pytest.raises(DataError) as err:
        data.list_examples(str(tmp_path), list(config_lib.TUTORIAL_CLASSES))
    assert message in str(err.value)


def test_missing_data_dir():
    with pytest.raises(DataError, match="data folder not found: /no/such"):
        data.list_examples("/no/such", ["a", "b"])


def _fake_examples(counts):
    return [data.Example(f"/d/{label}/img{i}.png", f"img{i}.png", label)
            for label, n in enumerate(counts) for i in range(n)]


def test_split_is_deterministic_whatever_the_listing_order():
    examples = _fake_examples([179 + 40, 1301 + 40, 1305 + 40])
    first = data.split_examples(examples, 3, 0.2, 40, seed=28)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    second = data.split_examples(shuffled, 3, 0.2, 40, seed=28)
    for name in data.SPLITS:
        assert sorted(e.path for e in first[name]) == sorted(e.path for e in second[name])


def test_split_is_stratified_disjoint_and_complete():
    examples = _fake_examples([219, 1341, 1345])
    parts = data.split_examples(examples, 3, 0.2, 40, seed=28)
    sets = {name: {e.path for e in parts[name]} for name in data.SPLITS}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert set().union(*sets.values()) == {e.path for e in examples}
    count = lambda name, label: sum(e.label == label for e in parts[name])  # noqa: E731
    assert [count("test", k) for k in range(3)] == [40, 40, 40]
    # the tutorial's training tree keeps 179/1301/1305, 20% of each to validation
    assert [count("val", k) for k in range(3)] == [36, 260, 261]
    assert [count("train", k) for k in range(3)] == [143, 1041, 1044]


def test_seed_changes_the_split():
    examples = _fake_examples([100, 100])
    a = data.split_examples(examples, 2, 0.2, 10, seed=1)
    b = data.split_examples(examples, 2, 0.2, 10, seed=2)
    assert {e.path for e in a["test"]} != {e.path for e in b["test"]}


def test_separate_test_tree(demo_tree, tmp_path):
    from trainer import demo_data
    test_root = tmp_path / "test"
    demo_data.generate(test_root, images_per_class=4, seed=3)
    config = config_lib.load("vanilla", overrides={"data_dir": str(demo_tree),
                                                   "test_dir": str(test_root)})
    splits = data.make_splits(config.data)
    assert splits.counts()["test"] == [4, 4, 4]
    assert sum(map(sum, splits.counts().values())) == 90 + 12  # nothing held out of training
    assert splits.counts()["val"] == [6, 6, 6]


def test_empty_training_class_is_a_data_error(demo_tree):
    config = config_lib.load("vanilla", overrides={"data_dir": str(demo_tree),
                                                   "test_per_class": 30})
    with pytest.raises(DataError, match="the training split has no images of class 'COVID-19'"):
        data.make_splits(config.data)


@pytest.mark.parametrize("cache", ["auto", "memory", "none"])
def test_dataset_shapes_dtypes_ranges_and_label_order(demo_tree, cache):
    config = config_lib.load("vanilla", overrides={"data_dir": str(demo_tree), "image_size": 24,
                                                   "test_per_class": 5, "cache": cache})
    splits = data.make_splits(config.data)
    ds = data.make_dataset(splits.test, config.data, batch_size=4, training=False)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (15, 24, 24, 3) and images.dtype == np.uint8  # models scale them
    assert labels.shape == (15, 3) and labels.dtype == np.float32
    np.testing.assert_array_equal(labels.argmax(1), [e.label for e in splits.test])
    # label index follows the configured class order: folder COVID-19 -> index 0
    assert all(("COVID-19" in e.path) == (e.label == 0) for e in splits.test)


@pytest.mark.parametrize("cache", ["memory", "none"])  # none: the file list is shuffled
def test_training_dataset_reshuffles_every_epoch(demo_tree, cache):
    config = config_lib.load("vanilla", overrides={"data_dir": str(demo_tree), "image_size": 8,
                                                   "test_per_class": 5, "cache": cache})
    splits = data.make_splits(config.data)
    ds = data.make_dataset(splits.train, config.data, batch_size=1000, training=True)
    first, second = [next(iter(ds))[0].numpy() for _ in range(2)]
    assert first.shape[0] == len(splits.train)
    assert not np.array_equal(first, second)
    np.testing.assert_allclose(np.sort(first.sum(axis=(1, 2, 3))), np.sort(second.sum(axis=(1, 2, 3))),
                               rtol=1e-5)


@pytest.mark.parametrize("names, expected", [
    (["a.png", "b.PNG", "c.bmp", "d.gif"], False), (["a.png", "b.JPG"], True),
    (["x/y.jpeg"], True), ([], False), (["jpg.png"], False),
])
def test_only_sets_with_jpeg_names_test_each_format(names, expected):
    assert data.has_jpeg_names(names) is expected


def test_a_jpeg_named_png_in_a_png_set_is_decoded_in_full(tmp_path):
    """Without JPEG names the pipeline skips the format test; a JPEG among the PNGs still
    decodes, in full, close to the shrink-in-decoder path that serving uses."""
    import tensorflow as tf
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (28, 28)), np.ones((8, 8))).astype(np.uint8)
    images = {"NORMAL/real.png": _encode(Image.fromarray(smooth), "PNG"),
              "NORMAL/disguised.png": _encode(Image.fromarray(smooth), "JPEG")}
    for name, raw in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(raw)
    config = config_lib.load("vanilla", overrides={"data_dir": str(tmp_path), "image_size": 50,
                                                   "classes": ["NORMAL"]})
    examples = sorted(data.list_examples(str(tmp_path), ["NORMAL"]), key=lambda e: e.relpath)
    x, _ = next(iter(data.make_dataset(examples, config.data, 2, training=False)))
    disguised, real = (images[f"NORMAL/{e.relpath}"] for e in examples)
    full = data.decode_pixels(disguised, 50, jpeg_shrink=False).numpy()
    np.testing.assert_array_equal(x[0].numpy(), full)
    shrunk = data.decode_pixels(disguised, 50).numpy()
    assert np.abs(full / 255 - shrunk / 255).mean() < 0.02
    np.testing.assert_array_equal(x[1].numpy(), data.decode_pixels(real, 50).numpy())
    assert not tf.io.is_jpeg(real) and tf.io.is_jpeg(disguised)


@pytest.mark.parametrize("n_images, cache, limit_mb, expected", [
    (20, "auto", 1, True), (10_000, "auto", 1, False), (10_000, "memory", 1, True),
    (10, "none", 4096, False),
])
def test_should_cache(n_images, cache, limit_mb, expected):
    cfg = dataclasses.replace(config_lib.DataConfig(), image_size=50, cache=cache,
                              cache_limit_mb=limit_mb)
    assert data.should_cache(cfg, n_images) is expected


# 50 px uint8 images take 7,500 bytes: 1 MiB holds 139 of them.
@pytest.mark.parametrize("n_images, cache, limit_mb, expected", [
    (20, "auto", 1, 20), (10_000, "auto", 1, 139), (10_000, "memory", 1, 10_000),
    (10, "none", 4096, 10), (10_000, "none", 1, 139), (0, "auto", 1, 1),
])
def test_shuffle_buffer_stays_within_the_cache_budget(n_images, cache, limit_mb, expected):
    cfg = dataclasses.replace(config_lib.DataConfig(), image_size=50, cache=cache,
                              cache_limit_mb=limit_mb)
    assert data.shuffle_buffer(cfg, n_images) == expected


@pytest.mark.parametrize("counts", [[179, 1301, 1305], [10, 10, 10], [1, 2, 97], [5, 50]])
def test_class_weights_equal_sklearn(counts):
    labels = [label for label, n in enumerate(counts) for _ in range(n)]
    ours = data.class_weights(labels, len(counts))
    theirs = compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels)
    np.testing.assert_allclose(list(ours.values()), theirs)


def test_class_weights_of_the_tutorial_split():
    labels = [0] * 179 + [1] * 1301 + [2] * 1305
    np.testing.assert_allclose(list(data.class_weights(labels, 3).values()),
                               [5.186, 0.714, 0.711], atol=1e-3)


def test_real_cxr3_tree_lists_and_splits(cxr3):
    config = config_lib.load("vanilla", overrides={"data_dir": str(cxr3)})
    splits = data.make_splits(config.data)
    counts = splits.counts()
    assert counts["test"] == [40, 40, 40]
    assert [sum(c) for c in zip(*counts.values())] == [921, 1341, 1345]
    x, y = next(iter(data.make_dataset(splits.test[:8], config.data, 8, training=False)))
    assert x.shape == (8, 50, 50, 3) and x.dtype == "uint8" and int(x.numpy().max()) > 0


def _tree_with_sources(root: Path) -> Path:
    """COVID-19 from sources b and a (in turn), the rest from k."""
    return tree_with_sources(root, ("b", "a"), ("k",))


def test_holdout_sources_go_to_test_only(tmp_path):
    root = _tree_with_sources(tmp_path / "data")
    config = config_lib.load("vanilla", overrides={"data_dir": str(root), "test_per_class": 2,
                                                   "holdout_sources": ["b"]})
    splits = data.make_splits(config.data)
    sources = dict(zip([e.path for e in splits.test],
                       data.read_sources(str(root), splits.test)))
    for name in ("train", "val"):
        assert "b" not in data.read_sources(str(root), getattr(splits, name))
    assert sum(s == "b" for s in sources.values()) == 10  # every image of the held-out source
    assert splits.counts()["test"] == [12, 2, 2]


def test_test_metrics_are_broken_down_by_source(tmp_path):
    from trainer import models, train
    root = _tree_with_sources(tmp_path / "data")
    config = config_lib.load("vanilla", overrides={"data_dir": str(root), "test_per_class": 4,
                                                   "image_size": 8, "holdout_sources": ["b"]})
    model = models.build(config.model, 8, 3)
    train.compile_model(model, config)
    results = train.evaluate(model, data.make_splits(config.data).test, config)
    by_source = results["sources"]["by_source"]
    assert {k: v["n"] for k, v in by_source.items()} == {"a": 4, "b": 10, "k": 8}
    assert results["sources"]["confounded_classes"] == ["COVID-19"]


@pytest.mark.parametrize("autotune", [False, True])
def test_autotuner_follows_the_config(demo_tree, autotune):
    config = config_lib.load("vanilla", overrides={"data_dir": str(demo_tree), "image_size": 8,
                                                   "test_per_class": 5, "autotune": autotune})
    splits = data.make_splits(config.data)
    for training in (True, False):
        ds = data.make_dataset(splits.train, config.data, 4, training=training)
        assert ds.options().autotune.enabled is autotune
