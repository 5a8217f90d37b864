"""The one Keras backend dist_bn runs on: TensorFlow (Horovod's TF ops, tf.custom_gradient).

Keras 3 also runs on JAX, PyTorch and NumPy; there dist_bn's layers would fail
deep inside TensorFlow on their first call. `require_tensorflow` fails at
construction instead, with one line that says what to set.
"""
import keras


def require_tensorflow(what):
    """Raise unless Keras runs on TensorFlow; `what` names the object being built."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{what} needs Keras's TensorFlow backend, but Keras runs on {backend!r}; "
            "set KERAS_BACKEND=tensorflow before Keras is imported."
        )
