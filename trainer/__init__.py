"""covid-cxr-trainer: train chest X-ray classifiers with tf.data and tf.distribute."""

__version__ = "0.1.0"
