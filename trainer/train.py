"""One training run: run directory, data, model under the strategy scope, fit, test evaluation."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import callbacks, checkpoints, config as config_lib, consistency, data, datacheck, \
    distribute, export, layout_weights, lung_field, metrics, mixup, models, \
    sources as sources_lib, storage, two_views
from trainer.config import Config
from trainer.errors import DataError, Preempted, RunDirError, TrainerError
from trainer.keras_api import keras

RUN_ARTIFACTS = ("config.yaml", "checkpoints", "backup", "logs", "history.csv",
                 "metrics.json", "export")
COMPARED_SECTIONS = ("data", "model", "augment", "train")


def default_model_dir(architecture: str, now: datetime.datetime | None = None) -> str:
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = os.path.join("runs", f"{architecture}-{stamp}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join("runs", f"{architecture}-{stamp}-{suffix}")
    return path


def config_changes(old: Config, new: Config) -> list[str]:
    """'section.key: old -> new' for each training-relevant difference a user made (keys the
    trainer sets itself, such as data.synthetic, are not compared: a run from before they
    existed resumes)."""
    chosen = config_lib.flag_fields()
    changes = []
    for section in COMPARED_SECTIONS:
        before = dataclasses.asdict(getattr(old, section))
        after = dataclasses.asdict(getattr(new, section))
        changes += [f"{section}.{k}: {before[k]!r} -> {after[k]!r}"
                    for k in after if k in chosen and before.get(k) != after[k]]
    return changes


def prepare_run_dir(config: Config) -> bool:
    """Makes model_dir ready; True when an interrupted run there will be resumed.

    A finished run (metrics.json) is replaced only with --overwrite; an interrupted one
    (config.yaml, no metrics.json) resumes if its config matches; any other non-empty
    folder is refused, so nothing the user wrote is lost.
    """
    model_dir = config.output.model_dir
    existing = storage.listdir(model_dir) if storage.isdir(model_dir) else []
    if existing and config.output.overwrite:
        logging.warning("--overwrite: removing the previous run's artifacts in %s", model_dir)
        for name in RUN_ARTIFACTS:
            storage.remove_tree(storage.join(model_dir, name))
        existing = storage.listdir(model_dir)
    finished = "metrics.json" in existing
    if finished:
        raise RunDirError(f"{model_dir} holds a finished run (metrics.json); pass --overwrite to "
                          "replace it, or choose another --model_dir")
    resuming = "config.yaml" in existing
    if resuming:
        old = config_lib.from_yaml_text(storage.read_text(storage.join(model_dir, "config.yaml")),
                                        storage.join(model_dir, "config.yaml"))
        changes = config_changes(old, config)
        if changes and not config.output.allow_config_change:
            raise RunDirError(f"{model_dir} holds an interrupted run with another config "
                              f"({'; '.join(changes)}); pass --overwrite to start over, "
                              "--allow_config_change to resume with the new settings, or use "
                              "the same settings to resume")
        if changes:
            logging.warning("--allow_config_change: resuming with %s", "; ".join(changes))
        logging.info("resuming the interrupted run in %s", model_dir)
    elif existing:
        raise RunDirError(f"{model_dir} is not empty and holds no run ({', '.join(existing[:5])}); "
                          "choose an empty or new --model_dir")
    try:
        storage.makedirs(model_dir)
        storage.write_text_atomic(storage.join(model_dir, "config.yaml"),
                                  config_lib.to_yaml(config))
    except Exception as err:  # permission, full disk, bad bucket: say so before training
        raise RunDirError(f"cannot write to --model_dir {model_dir}: "
                          f"{str(err).splitlines()[0][:200]}") from None
    return resuming


def backup_freq(config: Config) -> str | int:
    freq = config.train.backup_freq
    return freq if freq == "epoch" else int(freq)


def build_callbacks(config: Config, monitor: str, out_dir: str | None = None,
                    validation: callbacks.OneDeviceValidation | None = None
                    ) -> tuple[list, callbacks.StopOnNaN]:
    """The training callbacks; checkpoints, history and logs go to ``out_dir`` (model_dir on
    the chief, a temporary folder on other workers), the shared backup to model_dir/backup.
    ``validation`` comes first, so that every callback after it sees its figures."""
    model_dir = config.output.model_dir
    out_dir = out_dir or model_dir
    nan_guard = callbacks.StopOnNaN()
    return [
        *([validation] if validation else []),
        callbacks.EpochLog(config.train.epochs),
        nan_guard,
        keras.callbacks.EarlyStopping(monitor=monitor, patience=config.train.patience,
                                      min_delta=config.train.min_delta,
                                      mode=callbacks.monitor_mode(monitor),
                                      start_from_epoch=config.train.start_from_epoch),
        *([callbacks.ReduceLearningRate(monitor, config.train.lr_patience,
                                        config.train.lr_factor, config.train.min_delta)]
          if config.train.lr_patience else []),
        callbacks.BestAndLastCheckpoint(storage.join(out_dir, "checkpoints"), monitor=monitor,
                                        start_from_epoch=config.train.start_from_epoch),
        callbacks.HistoryCSV(storage.join(out_dir, "history.csv")),
        keras.callbacks.TensorBoard(storage.join(out_dir, "logs")),
        # Last, so an epoch is backed up only after its checkpoints and history row are written.
        callbacks.PreemptibleBackup(storage.join(model_dir, "backup"), save_freq=backup_freq(config),
                                    handle_sigterm=distribute.cluster_size() <= 1),
    ], nan_guard


def scaled_learning_rate(config: Config, replicas: int) -> float:
    """--lr_scaling=linear multiplies the learning rate by the replicas (the global batch grows)."""
    scale = replicas if config.runtime.lr_scaling == "linear" else 1
    return config.train.learning_rate * scale


def compile_model(model, config: Config, learning_rate: float | None = None) -> None:
    rate = config.train.learning_rate if learning_rate is None else learning_rate
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss=metrics.LOSS, metrics=metrics.compiled_metrics(),
                  jit_compile=config.runtime.jit_compile)


def one_device_copy(model, config: Config):
    """A compiled copy of ``model`` with its weights, built outside any strategy (call it
    outside a strategy's scope), for evaluation on one device."""
    copy = keras.models.clone_model(model)
    compile_model(copy, config)
    copy.set_weights(model.get_weights())
    return copy


def fit_inputs(model, splits: data.Splits, config: Config, strategy, me: distribute.Role,
               sample_weights: np.ndarray | None = None, val_weights: np.ndarray | None = None):
    """What fit reads: (training batches, validation batches, validation callback); the
    training and validation batches carry ``sample_weights`` and ``val_weights`` (one per
    image of the split) where given.

    With several replicas no replica may get an empty batch (oneDNN's CPU kernels fail on
    one), so every training batch is whole (a short last batch is dropped; the reshuffle
    leaves out other images each epoch) and validation runs on one device of the chief
    (``callbacks.OneDeviceValidation``, every image once) instead of in fit.
    """
    replicas = strategy.num_replicas_in_sync
    several = replicas > 1
    batch = config.train.batch_size * replicas  # batch_size is per replica
    if several and len(splits.train) < batch:
        raise DataError(f"the training split holds {len(splits.train)} images, fewer than one "
                        f"global batch of {batch} ({config.train.batch_size} per replica x "
                        f"{replicas} replicas), and every replica needs a whole batch at each "
                        "step; lower --batch_size or add images")
    train_batches = data.make_dataset(splits.train, config.data, batch, training=True,
                                      whole_batches=several, weights=sample_weights)
    if config.train.mixup:
        logging.info("mixup: each training image blended with another of its batch, its share "
                     "drawn from Beta(%g, %g)", config.train.mixup, config.train.mixup)
        train_batches = mixup.mixed(train_batches, config.train.mixup, config.data.seed)
    train_ds = models.feed_dataset(model, distribute.shard_by_data(train_batches))
    if not splits.val:
        return train_ds, None, None
    if not several:
        return train_ds, models.feed_dataset(model, data.make_dataset(
            splits.val, config.data, batch, training=False, weights=val_weights)), None
    if not me.is_chief:  # it receives the chief's figures
        return train_ds, None, callbacks.OneDeviceValidation(None, None, strategy, me)
    copy = one_device_copy(model, config)
    val_ds = models.feed_dataset(copy, data.make_dataset(
        splits.val, config.data, config.train.batch_size, training=False, weights=val_weights))
    return train_ds, None, callbacks.OneDeviceValidation(copy, val_ds, strategy, me)


def evaluate(model, examples: list[data.Example], config: Config) -> dict:
    """Test metrics: the compiled ones by name, the per-class report, and per source if known."""
    test_ds = models.feed_dataset(model, data.make_dataset(examples, config.data,
                                                           config.train.batch_size, training=False))
    named = model.evaluate(test_ds, return_dict=True, verbose=0)
    probs = model.predict(test_ds, verbose=0)
    labels = np.array([e.label for e in examples])
    warning = metrics.one_class_warning(labels, probs.argmax(axis=1), config.data.classes)
    if warning:
        logging.warning("test split: %s", warning)
    report = metrics.per_class(labels, probs, config.data.classes)
    sources = sources_lib.tree_sources(examples, [config.data.data_dir, config.data.test_dir])
    if sources:  # accuracy per hospital/source: a model may have learnt the source, not the disease
        report["sources"] = metrics.source_breakdown(sources, labels, probs.argmax(axis=1),
                                                     config.data.classes)
    return {"test": {k: float(v) for k, v in named.items()}, **report}


def log_data_summary(splits: data.Splits, weights: dict | None) -> None:
    for name, counts in splits.counts().items():
        logging.info("%-5s split: %5d images %s", name, sum(counts),
                     dict(zip(splits.classes, counts)))
    if weights is None:
        logging.info("class weights: none (--class_weights=none)")
    else:
        logging.info("class weights (balanced, from the training split): %s",
                     {c: round(w, 3) for c, w in zip(splits.classes, weights.values())})


def log_stop(cbs: list, config: Config, monitor: str) -> None:
    """Why training stopped, and which epoch the best checkpoint holds."""
    stopper = next(cb for cb in cbs if isinstance(cb, keras.callbacks.EarlyStopping))
    kept = next(cb for cb in cbs if isinstance(cb, callbacks.BestAndLastCheckpoint))
    if stopper.stopped_epoch:
        logging.info("early stopping at epoch %d: %s did not improve by more than %g for %d "
                     "epochs (--patience)", stopper.stopped_epoch + 1, monitor,
                     config.train.min_delta, config.train.patience)
    else:
        logging.info("trained the %d epochs asked for (--epochs)", config.train.epochs)
    if kept.best_epoch is not None:
        logging.info("keeping checkpoints/best.keras from epoch %d (%s %s: %.4f)",
                     kept.best_epoch,
                     "lowest" if callbacks.monitor_mode(monitor) == "min" else "highest",
                     monitor, kept.best)


def sample_weights(splits: data.Splits, config: Config,
                   weights: dict | None) -> np.ndarray | None:
    """Per training image, its --layout_weights weight (1 without) times its class weight;
    None where neither --layout_weights nor --mixup is on: fit applies the class weights.
    Keras does not combine class_weight with a dataset's own sample weights (its reshape of an
    unknown batch size fails), and mixup blends each image's weight with its partner's."""
    if not (config.train.layout_weights or config.train.mixup):
        return None
    films = (layout_weights.film_weights(splits.train, config.data, config.train.layout_weights)
             if config.train.layout_weights else np.ones(len(splits.train), np.float32))
    if weights is None:
        return films
    return films * np.array([weights[e.label] for e in splits.train], np.float32)


def validation_weights(splits: data.Splits, config: Config) -> np.ndarray | None:
    """Per validation image, its weight in val_loss (--val_class_weights): balanced, so that
    every class counts alike, or None (every image alike)."""
    mode = config.train.val_class_weights
    if not splits.val or mode == "none" or (mode == "auto" and not config.data.val_sources):
        return None
    labels = [e.label for e in splits.val]
    weights = data.class_weights(labels, len(splits.classes))
    logging.info("validation weights (balanced, from the validation split): %s",
                 {c: round(w, 3) for c, w in zip(splits.classes, weights.values())})
    return np.array([weights[label] for label in labels], np.float32)


def fit(model, train_ds, val_ds, config: Config, weights: dict | None, cbs: list,
        me: distribute.Role):
    """model.fit (``weights``: the class weights, None where the batches carry sample
    weights); a lost peer worker ends the run as preempted (exit 75): a restart resumes."""
    try:
        return model.fit(train_ds, validation_data=val_ds, epochs=config.train.epochs,
                         class_weight=weights, callbacks=cbs, verbose=0)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as err:
        if me.num_workers <= 1:
            raise
        raise Preempted(f"lost contact with another worker ({type(err).__name__}, see the log "
                        f"above); restart all workers to resume from "
                        f"{storage.join(config.output.model_dir, 'backup')}") from None


def run(config: Config) -> dict:
    """Trains, evaluates the best checkpoint on the test split, writes metrics.json."""
    model_dir = config.output.model_dir
    me = distribute.role(distribute.ensure_tf_config())
    # First TensorFlow work: MultiWorkerMirroredStrategy must start before any op runs.
    strategy = distribute.make_strategy(config.runtime.strategy)
    splits = data.make_splits(config.data)
    if config.data.check and not data.is_prepared(config.data.data_dir):  # prepare checked it
        splits = datacheck.check(splits, config.data)
    config = lung_field.with_box(config, splits.train)  # before config.yaml records it
    resuming = prepare_run_dir(config) if me.is_chief else False
    weights = (data.class_weights([e.label for e in splits.train], len(splits.classes))
               if config.train.class_weights == "balanced" else None)
    log_data_summary(splits, weights)
    per_image = sample_weights(splits, config, weights)

    replicas = strategy.num_replicas_in_sync
    precision = config.runtime.mixed_precision
    keras.mixed_precision.set_global_policy("float32" if precision == "none" else precision)
    learning_rate = scaled_learning_rate(config, replicas)
    with strategy.scope():
        keras.utils.set_random_seed(config.data.seed)
        model = models.build(config.model, config.data.image_size, len(splits.classes),
                             config.augment)
        compile_model(model, config, learning_rate)
        # here: compiled copies only evaluate
        consistency.use(model, config.train.consistency, config.train.consistency_fit)
        two_views.use(model)

    batch = config.train.batch_size * replicas  # batch_size is per replica
    logging.info("global batch %d = %d per replica x %d replicas; learning rate %g (lr_scaling=%s)",
                 batch, config.train.batch_size, replicas, learning_rate, config.runtime.lr_scaling)
    train_ds, val_ds, validation = fit_inputs(model, splits, config, strategy, me, per_image,
                                              validation_weights(splits, config))
    monitor = ("val_" if splits.val else "") + config.train.monitor
    out_dir = model_dir if me.is_chief else distribute.worker_temp_dir(me)
    try:
        cbs, nan_guard = build_callbacks(config, monitor, out_dir, validation)
        logging.info("training %s on %d images (%s), up to %d epochs%s",
                     config.model.architecture, len(splits.train), out_dir, config.train.epochs,
                     " (resuming)" if resuming else "")
        history = fit(model, train_ds, val_ds, config, weights if per_image is None else None,
                      cbs, me)
    finally:
        if not me.is_chief:
            distribute.remove_worker_temp_dir(out_dir)
    backup = next(cb for cb in cbs if isinstance(cb, callbacks.PreemptibleBackup))
    if backup.preempted_at:
        epoch, step = backup.preempted_at
        raise Preempted(f"stopped by SIGTERM at epoch {epoch}, step {step} after saving "
                        f"{storage.join(model_dir, 'backup')}; run the same command again to resume")
    if nan_guard.where:
        epoch, step = nan_guard.where
        raise TrainerError(f"training stopped: the loss became NaN or infinite at epoch {epoch}, "
                           f"step {step}; the last good checkpoints are in "
                           f"{storage.join(model_dir, 'checkpoints')}. Lower --learning_rate.")

    log_stop(cbs, config, monitor)
    distribute.barrier(strategy, me)  # every worker has written its last backup
    if not me.is_chief:
        logging.info("training complete; the chief writes the results to %s", model_dir)
        return {}
    storage.remove_tree(storage.join(model_dir, "backup"))  # training completed: nothing to resume
    best_path = storage.join(model_dir, "checkpoints", "best.keras")
    best = checkpoints.load(best_path) if storage.exists(best_path) else \
        one_device_copy(model, config)  # the chief alone: not under the strategy
    results = evaluate(best, splits.test, config)
    results.update(
        model_dir=model_dir, checkpoint="checkpoints/best.keras", counts=splits.counts(),
        class_weights=None if weights is None else list(weights.values()),
        last_epoch=history.epoch[-1] + 1 if history.epoch else None)
    storage.write_text_atomic(storage.join(model_dir, "metrics.json"),
                              json.dumps(results, indent=2))
    export.save(best, config, storage.join(model_dir, "export"))  # serving SavedModel (chief only)
    print(metrics.format_named(results["test"]))
    print()
    print(metrics.format_per_class(results))
    logging.info("run complete: %s", model_dir)
    return results
