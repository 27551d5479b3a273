"""Choosing the tf.distribute strategy; TF_CONFIG from a Kubernetes Indexed Job; chief or worker.

The cluster part is plain Python (TensorFlow is imported only to build a strategy), so a
broken environment is reported in one line naming the variable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
from typing import Mapping, MutableMapping

from absl import logging

from trainer.errors import ConfigError

# The Indexed Job contract shared with the Kubernetes manifests (k8s/).
ENV_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes for Indexed Jobs
ENV_JOB_NAME = "CXR_JOB_NAME"  # the Job's name: pods are <job>-<index>
ENV_NUM_WORKERS = "CXR_NUM_WORKERS"
ENV_SERVICE = "CXR_WORKER_SERVICE"  # the headless Service (the pods' subdomain)
ENV_PORT = "CXR_WORKER_PORT"
DEFAULT_PORT = 2222
TRAINING_TASKS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's place in the cluster: its task, whether it is the chief, how many
    training tasks (chief and workers) there are."""

    task_type: str = "worker"
    task_index: int = 0
    is_chief: bool = True
    num_workers: int = 1


def _int_env(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def tf_config_from_env(env: Mapping[str, str]) -> dict | None:
    """TF_CONFIG for worker JOB_COMPLETION_INDEX of an Indexed Job of CXR_NUM_WORKERS pods.

    None when TF_CONFIG is already set or there is one worker. Worker i is reached at
    ``<CXR_JOB_NAME>-<i>.<CXR_WORKER_SERVICE>:<CXR_WORKER_PORT>``; worker 0 is the chief.
    """
    if env.get("TF_CONFIG") or not env.get(ENV_NUM_WORKERS):
        return None
    count = _int_env(env, ENV_NUM_WORKERS)
    if count < 1:
        raise ConfigError(f"{ENV_NUM_WORKERS} must be at least 1, got {count}")
    if count == 1:
        return None
    if ENV_INDEX not in env:
        raise ConfigError(f"{ENV_INDEX} is not set; {ENV_NUM_WORKERS}={count} needs an Indexed "
                          "Job (completionMode: Indexed) or a TF_CONFIG")
    index = _int_env(env, ENV_INDEX)
    if not 0 <= index < count:
        raise ConfigError(f"{ENV_INDEX} must be in [0, {count - 1}] for {ENV_NUM_WORKERS}="
                          f"{count}, got {index}")
    names = {}
    for name in (ENV_JOB_NAME, ENV_SERVICE):
        names[name] = env.get(name, "").strip()
        if not names[name]:
            raise ConfigError(f"{name} is not set; it is needed to build TF_CONFIG for "
                              f"{ENV_NUM_WORKERS}={count}")
    port = _int_env(env, ENV_PORT) if env.get(ENV_PORT, "").strip() else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ConfigError(f"{ENV_PORT} must be a port number in [1, 65535], got {port}")
    workers = [f"{names[ENV_JOB_NAME]}-{i}.{names[ENV_SERVICE]}:{port}" for i in range(count)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def read_tf_config(env: Mapping[str, str]) -> dict:
    """TF_CONFIG parsed and checked ({} when unset), else the one an Indexed Job implies."""
    raw = env.get("TF_CONFIG", "").strip()
    if not raw:
        return tf_config_from_env(env) or {}
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({err})") from None
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError("TF_CONFIG needs a 'cluster' mapping and a 'task' "
                          '{"type": ..., "index": ...}')
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(f"TF_CONFIG task {task} is not in its cluster "
                          f"({ {k: len(v) for k, v in cluster.items()} })")
    return tf_config


def ensure_tf_config(env: MutableMapping[str, str] = os.environ) -> dict:
    """Sets TF_CONFIG from the Indexed Job's environment when it is unset; returns it parsed."""
    tf_config = read_tf_config(env)
    if tf_config and not env.get("TF_CONFIG"):
        env["TF_CONFIG"] = json.dumps(tf_config)
        logging.info("TF_CONFIG built from the Indexed Job environment: %s", env["TF_CONFIG"])
    return tf_config


def cluster_size(tf_config: Mapping | None = None) -> int:
    """Tasks in TF_CONFIG's cluster (1 when there is no TF_CONFIG)."""
    cluster = (read_tf_config(os.environ) if tf_config is None else tf_config).get("cluster", {})
    return max(1, sum(len(tasks) for tasks in cluster.values()))


def role(tf_config: Mapping) -> Role:
    """Chief: the 'chief' task if the cluster has one (Kubeflow), else worker 0."""
    if not tf_config:
        return Role()
    cluster, task = tf_config["cluster"], tf_config["task"]
    kind, index = task["type"], task.get("index", 0)
    has_chief = bool(cluster.get("chief"))
    chief = kind == "chief" or (kind == "worker" and index == 0 and not has_chief)
    trainers = sum(len(cluster.get(k, [])) for k in TRAINING_TASKS)
    return Role(kind, index, chief, max(1, trainers))


def resolve_name(name: str, tf_config: Mapping | None = None) -> str:
    """'auto': multi_worker for a multi-task TF_CONFIG, mirrored for several GPUs, else default."""
    if name != "auto":
        return name
    if cluster_size(tf_config) > 1:
        return "multi_worker"
    import tensorflow as tf
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def mirrored_devices() -> list[str]:
    """Every GPU; without GPUs, every logical CPU device (one unless configured otherwise)."""
    import tensorflow as tf
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def make_strategy(name: str, tf_config: Mapping | None = None):
    """The strategy ``name`` asks for (see resolve_name); logs once which devices it trains on."""
    tf_config = ensure_tf_config() if tf_config is None else tf_config
    resolved = resolve_name(name, tf_config)
    import tensorflow as tf
    if resolved == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif resolved == "mirrored":
        strategy = tf.distribute.MirroredStrategy(mirrored_devices())
    elif resolved == "one_device":  # MirroredStrategy on one device: BackupAndRestore rejects
        gpus = tf.config.list_logical_devices("GPU")  # OneDeviceStrategy
        strategy = tf.distribute.MirroredStrategy([gpus[0].name if gpus else "/cpu:0"])
    else:
        strategy = tf.distribute.get_strategy()
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: TensorFlow places ops on the first GPU
        devices = [d.name for d in tf.config.list_logical_devices("GPU")][:1] or ["/cpu:0"]
    logging.info("%s (strategy: %s, replicas: %d)", device_line("training", gpu_models(), devices),
                 resolved, strategy.num_replicas_in_sync)
    if resolved == "multi_worker":
        me = role(tf_config)
        logging.info("cluster: %d workers; this is %s %d (%s)", me.num_workers, me.task_type,
                     me.task_index, "chief" if me.is_chief else "non-chief")
    return strategy


def gpu_models() -> list[str]:
    """This machine's GPUs as TensorFlow sees them, by model name (e.g. 'NVIDIA L4')."""
    import tensorflow as tf
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name", "GPU"))
        except (ValueError, RuntimeError):
            names.append("GPU")
    return names


def device_line(verb: str, gpus: list[str], devices: list[str]) -> str:
    """What runs where, in plain words: 'training on CPU: no GPU found', 'training on 2 GPUs:
    GPU:0, GPU:1 (NVIDIA L4)'. ``gpus``: the machine's GPU models; ``devices``: the device
    names the work is placed on."""
    used = [d.rsplit("device:", 1)[-1].lstrip("/").upper() for d in devices
            if "GPU" in d.upper()]
    if not gpus:
        where = "CPU" if len(devices) <= 1 else f"{len(devices)} CPU devices"
        return f"{verb} on {where}: no GPU found"
    found = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(sorted(set(gpus)))})"
    if not used:
        return f"{verb} on CPU although {found} found"
    line = (f"{verb} on {len(used)} GPU{'s' if len(used) > 1 else ''}: {', '.join(used)} "
            f"({', '.join(sorted(set(gpus)))})")
    if len(used) < len(gpus):
        line += f"; {len(gpus) - len(used)} more unused (--strategy=auto or mirrored uses all)"
    return line


def local_device_line(verb: str) -> str:
    """``device_line`` for work TensorFlow places itself (on the first GPU, if any)."""
    import tensorflow as tf
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return device_line(verb, gpu_models(), gpus[:1] or ["/cpu:0"])


def shard_by_data(dataset):
    """Auto-shard by element under MultiWorkerMirroredStrategy: every worker gets distinct
    images of each global batch. (The FILE policy needs file readers such as TFRecordDataset;
    on a dataset of decoded image files tf.data would fall back to DATA with a warning.)"""
    import tensorflow as tf
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def barrier(strategy, me: Role) -> None:
    """Waits until every worker reaches this point (a tiny all-reduce); no-op on one worker."""
    import tensorflow as tf
    if me.num_workers <= 1:
        return
    ones = strategy.run(tf.function(lambda: tf.constant(1.0)))
    strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)


def share_from_chief(strategy, me: Role, values: list[float]) -> list[float]:
    """The chief's ``values`` on every worker: an all-reduce to which only the first replica
    (on the chief) adds anything. On one worker, ``values`` as they are."""
    import tensorflow as tf
    if me.num_workers <= 1:
        return list(values)
    mine = tf.constant(values if me.is_chief else [0.0] * len(values), tf.float32)

    def contribution():
        first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
        return tf.where(first, mine, tf.zeros_like(mine))

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.function(contribution)),
                            axis=None)
    return [float(v) for v in total.numpy()]


def outside_strategy(fn):
    """``fn()`` in a thread of its own, where no tf.distribute scope is open (scopes are per
    thread): Keras keeps the strategy's scope open while fit runs its callbacks, and a model
    built outside it must not be run under it."""
    result, failure = [], []

    def call():
        try:
            result.append(fn())
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=call, name="outside-strategy")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def worker_temp_dir(me: Role) -> str:
    """A local temporary folder for a non-chief worker's checkpoints and logs."""
    return tempfile.mkdtemp(prefix=f"cxr-{me.task_type}{me.task_index}-")


def remove_worker_temp_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
