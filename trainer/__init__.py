"""covid-cxr-trainer: train chest X-ray classifiers with tf.data and tf.distribute."""
import os

# TensorFlow's C++ INFO lines (CUDA probing, CPU features) drown the trainer's own log;
# set before any module imports TensorFlow. An explicit user setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
