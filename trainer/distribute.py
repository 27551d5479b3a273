"""Choosing the tf.distribute strategy."""
from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging


def cluster_size() -> int:
    """Tasks in TF_CONFIG's cluster (1 when TF_CONFIG is unset)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 1
    cluster = json.loads(raw).get("cluster", {})
    return sum(len(tasks) for tasks in cluster.values())


def resolve_name(name: str) -> str:
    """'auto': multi_worker for a multi-task TF_CONFIG, mirrored for several GPUs, else default."""
    if name != "auto":
        return name
    if cluster_size() > 1:
        return "multi_worker"
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def make_strategy(name: str) -> tf.distribute.Strategy:
    resolved = resolve_name(name)
    if resolved == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif resolved == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif resolved == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    else:
        strategy = tf.distribute.get_strategy()
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy places ops itself
        devices = [d.name for d in tf.config.list_logical_devices() if d.device_type != "CPU"] \
            or ["/cpu:0"]
    logging.info("strategy: %s (%s), replicas: %d, devices: %s", resolved,
                 type(strategy).__name__, strategy.num_replicas_in_sync, ", ".join(devices))
    return strategy
