"""Strategy choice, TF_CONFIG from an Indexed Job's environment, chief/worker roles, batch and
learning-rate scaling, MirroredStrategy over two logical CPU devices, mixed precision.

Runs that need two logical CPU devices run in a subprocess: the device layout must be set
before TensorFlow initialises, which the pytest process may already have done.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import run_python, script_result
from trainer import config as config_lib, distribute, models
from trainer.errors import ConfigError

JOB = {"CXR_JOB_NAME": "cxr-train", "CXR_WORKER_SERVICE": "cxr-workers"}


def _workers(n: int, port: int = 2222) -> list[str]:
    return [f"cxr-train-{i}.cxr-workers:{port}" for i in range(n)]


# env -> expected TF_CONFIG (None: no cluster, run as one worker).
VALID_ENVS = [
    ({}, None),
    ({"CXR_NUM_WORKERS": "1", "JOB_COMPLETION_INDEX": "0"}, None),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "0"},
     {"cluster": {"worker": _workers(2)}, "task": {"type": "worker", "index": 0}}),
    ({**JOB, "CXR_NUM_WORKERS": "3", "JOB_COMPLETION_INDEX": "2"},
     {"cluster": {"worker": _workers(3)}, "task": {"type": "worker", "index": 2}}),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "1", "CXR_WORKER_PORT": "12345"},
     {"cluster": {"worker": _workers(2, 12345)}, "task": {"type": "worker", "index": 1}}),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "1", "CXR_WORKER_PORT": ""},
     {"cluster": {"worker": _workers(2)}, "task": {"type": "worker", "index": 1}}),
    # An existing TF_CONFIG (Kubeflow's operator, or set by hand) always wins.
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "1", "TF_CONFIG": "{}"}, None),
]

# env -> the variable the one-line error must name.
BROKEN_ENVS = [
    ({**JOB, "CXR_NUM_WORKERS": "two", "JOB_COMPLETION_INDEX": "0"}, "CXR_NUM_WORKERS"),
    ({**JOB, "CXR_NUM_WORKERS": "0", "JOB_COMPLETION_INDEX": "0"}, "CXR_NUM_WORKERS"),
    ({**JOB, "CXR_NUM_WORKERS": "2"}, "JOB_COMPLETION_INDEX"),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX"),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "2"}, "JOB_COMPLETION_INDEX"),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "-1"}, "JOB_COMPLETION_INDEX"),
    ({"CXR_JOB_NAME": "cxr-train", "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "0"},
     "CXR_WORKER_SERVICE"),
    ({"CXR_WORKER_SERVICE": "s", "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "0"},
     "CXR_JOB_NAME"),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "0", "CXR_WORKER_SERVICE": " "},
     "CXR_WORKER_SERVICE"),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "0", "CXR_WORKER_PORT": "http"},
     "CXR_WORKER_PORT"),
    ({**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "0", "CXR_WORKER_PORT": "70000"},
     "CXR_WORKER_PORT"),
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                               "task": {"type": "worker", "index": 3}})}, "TF_CONFIG"),
    ({"TF_CONFIG": json.dumps({"task": {"type": "worker", "index": 0}})}, "TF_CONFIG"),
]


@pytest.mark.parametrize("env, expected", VALID_ENVS)
def test_tf_config_from_indexed_job_env(env, expected):
    assert distribute.tf_config_from_env(env) == expected


@pytest.mark.parametrize("env, variable", BROKEN_ENVS)
def test_broken_cluster_env_names_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable) as err:
        distribute.read_tf_config(env)
    assert "\n" not in str(err.value)


def test_ensure_tf_config_sets_the_variable_once():
    env = {**JOB, "CXR_NUM_WORKERS": "2", "JOB_COMPLETION_INDEX": "1"}
    built = distribute.ensure_tf_config(env)
    assert json.loads(env["TF_CONFIG"]) == built
    assert distribute.ensure_tf_config(env) == built  # now read back, not rebuilt


KUBEFLOW = {"cluster": {"chief": ["c-0:2222"], "worker": ["w-0:2222", "w-1:2222"]}}
ROLES = [  # TF_CONFIG -> (task type, index, is chief, training tasks)
    ({}, ("worker", 0, True, 1)),
    ({"cluster": {"worker": _workers(2)}, "task": {"type": "worker", "index": 0}},
     ("worker", 0, True, 2)),
    ({"cluster": {"worker": _workers(2)}, "task": {"type": "worker", "index": 1}},
     ("worker", 1, False, 2)),
    ({**KUBEFLOW, "task": {"type": "chief", "index": 0}}, ("chief", 0, True, 3)),
    ({**KUBEFLOW, "task": {"type": "worker", "index": 0}}, ("worker", 0, False, 3)),
    ({**KUBEFLOW, "task": {"type": "worker", "index": 1}}, ("worker", 1, False, 3)),
]


@pytest.mark.parametrize("tf_config, expected", ROLES)
def test_role(tf_config, expected):
    me = distribute.role(tf_config)
    assert (me.task_type, me.task_index, me.is_chief, me.num_workers) == expected


@pytest.mark.parametrize("name, tf_config, expected", [
    ("auto", {"cluster": {"worker": _workers(2)}, "task": {"type": "worker", "index": 0}},
     "multi_worker"),
    ("auto", {}, "default"),  # no GPU in CI
    ("mirrored", {}, "mirrored"),
    ("one_device", {"cluster": {"worker": _workers(2)}, "task": {"type": "worker", "index": 0}},
     "one_device"),
])
def test_resolve_name(name, tf_config, expected):
    assert distribute.resolve_name(name, tf_config) == expected


GPU = "/job:localhost/replica:0/task:0/device:GPU:{}"


@pytest.mark.parametrize("gpus, devices, expected", [
    ([], ["/cpu:0"], "training on CPU: no GPU found"),
    ([], ["/cpu:0", "/cpu:1"], "training on 2 CPU devices: no GPU found"),
    (["NVIDIA L4"], ["/gpu:0"], "training on 1 GPU: GPU:0 (NVIDIA L4)"),
    (["NVIDIA L4"] * 2, [GPU.format(0), GPU.format(1)],
     "training on 2 GPUs: GPU:0, GPU:1 (NVIDIA L4)"),
    (["NVIDIA L4"] * 2, [GPU.format(0)],
     "training on 1 GPU: GPU:0 (NVIDIA L4); 1 more unused (--strategy=auto or mirrored uses all)"),
    (["NVIDIA H200"], ["/cpu:0"], "training on CPU although 1 GPU (NVIDIA H200) found"),
])
def test_device_line_says_what_runs_where(gpus, devices, expected):
    assert distribute.device_line("training", gpus, devices) == expected


@pytest.mark.parametrize("overrides, error", [
    ({"backup_freq": "epoch"}, None),
    ({"backup_freq": "25"}, None),
    ({"backup_freq": "0"}, "--backup_freq"),
    ({"backup_freq": "often"}, "--backup_freq"),
    ({"lr_scaling": "linear"}, None),
    ({"lr_scaling": "sqrt"}, "--lr_scaling"),
    ({"strategy": "tpu"}, "--strategy"),
])
def test_distribution_flags_are_validated(overrides, error):
    config = config_lib.load("vanilla", overrides=overrides)
    if error is None:
        config_lib.validate(config, models.min_image_sizes())
    else:
        with pytest.raises(ConfigError, match=error):
            config_lib.validate(config, models.min_image_sizes())


@pytest.mark.parametrize("scaling, replicas, expected", [
    ("none", 1, 0.001), ("none", 8, 0.001), ("linear", 1, 0.001), ("linear", 8, 0.008)])
def test_learning_rate_scaling(scaling, replicas, expected):
    from trainer import train
    config = config_lib.load("vanilla", overrides={"lr_scaling": scaling})
    assert train.scaled_learning_rate(config, replicas) == pytest.approx(expected)


def test_mixed_bfloat16_trains_a_step_on_cpu():
    from trainer import train
    from trainer.keras_api import keras
    config = config_lib.load("vanilla", overrides={"image_size": 16, "mixed_precision":
                                                   "mixed_bfloat16"})
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build(config.model, 16, 3)
        train.compile_model(model, config)
        x = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
        y = np.eye(3, dtype=np.float32)[np.arange(8) % 3]
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv").compute_dtype == "bfloat16"
    assert model.output.dtype.name == "float32"  # softmax kept in float32
    assert np.isfinite(history.history["loss"][0])


# --- MirroredStrategy over two logical CPU devices, in subprocesses -------------------------

TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

TRAIN_SCRIPT = TWO_CPUS + """
import sys
from trainer import task
sys.argv = ["trainer.task"] + sys.argv[1:]
task.run()
"""

# 30 images per class: 6 test, 8 validation and 16 training images each, so that the 48
# training images are whole global batches of 16 (with two replicas a short one is dropped).
SMALL_RUN = ["--model=vanilla", "--image_size=16", "--test_per_class=6", "--epochs=12",
             "--patience=10", "--seed=3", "--validation_split=0.3333"]
# Tolerance for two training runs that differ only in how the global batch is split: the
# gradients match up to float summation order, the dropout masks do not (they are drawn per
# replica), so a few of the 18 test images may change class. Twelve epochs take the model past
# near-uniform predictions (after 3, loss ~0.98 against ln 3 = 1.10, argmax ties flipped 6 images).
TOLERANCE = {"loss": 0.05, "accuracy": 0.2}


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    """The same run twice from the same seed: one device with batch 16, two replicas x 8."""
    from trainer import demo_data
    root = tmp_path_factory.mktemp("mirrored")
    demo_data.generate(root / "data", images_per_class=30, seed=5)
    runs = {}
    for name, batch in (("one_device", 16), ("mirrored", 8)):
        done = run_python(TRAIN_SCRIPT, *SMALL_RUN, f"--data_dir={root / 'data'}",
                          f"--model_dir={root / name}", f"--strategy={name}", f"--batch_size={batch}")
        runs[name] = (root / name, done.stdout + done.stderr)
    return runs


def test_mirrored_logs_replicas_and_global_batch(mirrored_runs):
    log = mirrored_runs["mirrored"][1]
    assert "(strategy: mirrored, replicas: 2)" in log
    assert "global batch 16 = 8 per replica x 2 replicas" in log
    assert "global batch 16 = 16 per replica x 1 replicas" in mirrored_runs["one_device"][1]


def test_mirrored_matches_one_device_from_the_same_initial_weights(mirrored_runs):
    results = {name: json.loads((path / "metrics.json").read_text())["test"]
               for name, (path, _) in mirrored_runs.items()}
    print("test metrics, one device vs 2 replicas:", results)
    for metric, tolerance in TOLERANCE.items():
        assert results["mirrored"][metric] == pytest.approx(results["one_device"][metric],
                                                            abs=tolerance), (metric, results)


def test_two_replicas_validate_every_image_once(mirrored_runs):
    """The two-replica run validates on one device: the figures it recorded for its best
    epoch are those of its best checkpoint evaluated here on the whole validation split."""
    from trainer import checkpoints, data
    path = mirrored_runs["mirrored"][0]
    config = config_lib.from_yaml_text((path / "config.yaml").read_text(), "config.yaml")
    best_epoch = json.loads((path / "checkpoints" / "best.json").read_text())["epoch"]
    with open(path / "history.csv") as f:
        recorded = list(csv.DictReader(f))[best_epoch - 1]
    model = checkpoints.load(str(path / "checkpoints" / "best.keras"))
    val = data.make_splits(config.data).val
    again = model.evaluate(models.feed_dataset(model, data.make_dataset(
        val, config.data, 8, training=False)), return_dict=True, verbose=0)
    assert float(recorded["val_tp"]) + float(recorded["val_fn"]) == len(val) == 24
    for name in ("loss", "accuracy", "tp", "fp", "auc"):
        assert float(recorded[f"val_{name}"]) == pytest.approx(again[name], abs=1e-5), name


@pytest.mark.parametrize("flag, logged", [
    ("--layout_weights=5", "layout weights (clip 5; within all)"),
    ("--two_views", "two views: the whole film and its chest crop, each through its own vanilla"),
    ("--val_class_weights=balanced", "validation weights (balanced, from the validation split)"),
])
def test_two_replicas_train_with_an_option_of_their_own_step(mirrored_runs, tmp_path, flag,
                                                             logged):
    """Options that change what a step computes, under MirroredStrategy: --layout_weights
    (weighted batches split across replicas), --two_views (each tower fitted on its own
    loss, a replaced train_step) and --val_class_weights (weighted batches validated on one
    device): the run trains, records and exports."""
    data_dir = mirrored_runs["mirrored"][0].parent / "data"
    done = run_python(TRAIN_SCRIPT, *SMALL_RUN, f"--data_dir={data_dir}", "--epochs=2",
                      f"--model_dir={tmp_path / 'run'}", "--strategy=mirrored", "--batch_size=8",
                      flag)
    log = done.stdout + done.stderr
    assert "(strategy: mirrored, replicas: 2)" in log
    assert logged in log
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert len(history) == 2 and all(np.isfinite(float(row["loss"])) for row in history)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "export" / "saved_model.pb").is_file()


# --- No replica is ever handed an empty batch (oneDNN's CPU kernels fail on one) -------------

# Builds what fit reads, exactly as train.run does, with MirroredStrategy over N logical CPUs:
# it splits each global batch across replicas as MultiWorkerMirroredStrategy splits it across
# workers. Image i is a flat grey of value 10 * i, so a batch says which images it holds.
WHOLE_BATCHES_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
replicas, root = int(sys.argv[1]), Path(sys.argv[2])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
from PIL import Image
from trainer import config as config_lib, data, distribute, models, train
from trainer.errors import DataError
classes = ["COVID-19", "NORMAL", "Viral Pneumonia"]
examples = []
for i in range(17):
    path = root / f"{i:02d}.png"
    Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(path)
    examples.append(data.Example(str(path), path.name, i % 3))
config = config_lib.load("vanilla", overrides={"image_size": 16, "batch_size": 2})
strategy = distribute.make_strategy("mirrored", {})
with strategy.scope():
    model = models.build(config.model, 16, 3)
    train.compile_model(model, config)

def batches(ds, distributed):
    ds = strategy.experimental_distribute_dataset(ds) if distributed else ds
    out = []
    for images, _ in ds:
        parts = strategy.experimental_local_results(images) if distributed else [images]
        out.append([sorted(int(v) // 10 for v in part[:, 0, 0, 0].numpy()) for part in parts])
    return out

results = {}
for n in (1, 7, 9, 17):
    splits = data.Splits(classes, examples[:n], examples[:n], [])
    try:
        train_ds, val_ds, validation = train.fit_inputs(model, splits, config, strategy,
                                                        distribute.Role())
    except DataError as err:
        results[n] = {"refused": str(err)}
        continue
    result = {"train": batches(train_ds, True)}
    if val_ds is not None:  # validated in fit, split across replicas
        result["val_in_fit"] = batches(val_ds, True)
    if validation is not None:
        result["val_one_device"] = batches(validation.dataset, False)
        history = model.fit(train_ds, epochs=1, callbacks=[validation], verbose=0).history
        result["val_counted"] = history["val_tp"][0] + history["val_fn"][0]
    results[n] = result
print("RESULT " + json.dumps(results))
"""


@pytest.mark.parametrize("replicas", [2, 3])
def test_no_replica_ever_gets_an_empty_batch(replicas, tmp_path):
    done = run_python(WHOLE_BATCHES_SCRIPT, str(replicas), str(tmp_path))
    results = {int(n): r for n, r in script_result(done).items()}
    global_batch = 2 * replicas
    for n, result in results.items():
        if n < global_batch:  # not one whole step: said plainly, before any training
            assert "fewer than one global batch" in result["refused"], (n, result)
            assert "--batch_size" in result["refused"]
            continue
        steps = result["train"]
        assert all(len(step) == replicas and all(step) for step in steps), (n, steps)
        seen = [i for step in steps for part in step for i in part]
        assert len(seen) == len(set(seen)) == n // global_batch * global_batch, (n, steps)
        assert "val_in_fit" not in result, (n, result)  # never split across replicas
        one_device = [i for (part,) in result["val_one_device"] for i in part]
        assert sorted(one_device) == list(range(n)), (n, result["val_one_device"])
        assert result["val_counted"] == n  # the validation figures count each image once
