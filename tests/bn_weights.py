"""Non-trivial BN weights for tests that compare a model before and after a rewrite."""
import keras

from dist_bn.convert import walk


def randomize_bn(model, rng, mean_offset=0.0, min_variance=0.5, variance_span=1.0, signed_gamma=False):
    """Give every BatchNormalization at any depth random moving statistics, gamma and beta.

    Moving variances are uniform in [min_variance, min_variance + variance_span);
    gamma is uniform in [0.5, 1.5), or standard normal with `signed_gamma`.
    """
    for _, layer in walk(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.randn(c) + mean_offset)
            layer.moving_variance.assign(rng.rand(c) * variance_span + min_variance)
            if layer.scale:
                layer.gamma.assign(rng.randn(c) if signed_gamma else rng.rand(c) + 0.5)
            if layer.center:
                layer.beta.assign(rng.randn(c))
