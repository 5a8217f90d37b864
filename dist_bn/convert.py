"""`convert_sync_batchnorm`: swap every BatchNormalization of a model for ours."""
import keras

from dist_bn.sync_batch_normalization import SyncBatchNormalization


def convert_sync_batchnorm(model, process_set=None, unbiased_moving_variance=False):
    """A copy of a Keras model with every BatchNormalization made synchronized.

    Works on Sequential and functional models, nested ones included: the model
    is cloned with `keras.models.clone_model`, each `BatchNormalization`
    becomes a `SyncBatchNormalization` with the same config, and every weight,
    moving statistics included, is carried over (the two layers keep their
    weights in the same order). The original model is not changed. Subclassed
    models cannot be cloned; build those with SyncBatchNormalization directly.
    """

    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            config = layer.get_config()
            config.pop("synchronized", None)
            return SyncBatchNormalization(
                **config,
                process_set=process_set,
                unbiased_moving_variance=unbiased_moving_variance,
            )
        return layer.__class__.from_config(layer.get_config())

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    converted.set_weights(model.get_weights())
    return converted
