"""The pure numerics of dist_bn.moments, one rank's pieces merged by hand."""
import numpy as np
import pytest
import tensorflow as tf

from dist_bn import reference
from dist_bn import moments


def merged(parts, axis):
    """Pack each part's local moments, sum the packs (what an all-reduce does), unpack."""
    ndim = parts[0].ndim
    axes = moments.reduction_axes(ndim, axis)
    packs = [moments.pack_moments(*moments.local_moments(tf.constant(p), axes)) for p in parts]
    return [t.numpy() for t in moments.unpack_moments(tf.add_n(packs))]


@pytest.mark.parametrize("sizes", [[4, 4], [1, 7], [0, 5, 3], [0, 0, 2], [6]])
@pytest.mark.parametrize("axis", [-1, 1])
def test_merge_equals_moments_of_the_concatenation(sizes, axis):
    rng = np.random.RandomState(sum(sizes))
    x = (3.0 + 2.0 * rng.randn(sum(sizes), 4, 3, 5)).astype(np.float32)
    parts = np.split(x, np.cumsum(sizes)[:-1])
    count, mean, var = merged(parts, axis)
    ref_count, ref_mean, ref_var = reference.moments(x, axis)
    assert count == ref_count
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6, atol=1e-6)


def test_merge_stays_exact_when_mean_dwarfs_std():
    rng = np.random.RandomState(0)
    x = (1e3 + rng.randn(64, 8, 8, 3)).astype(np.float32)
    _, _, var = merged([x[:10], x[10:], x[:0]], -1)
    _, _, ref_var = reference.moments(x, -1)
    naive = (np.mean(x * x, axis=(0, 1, 2), dtype=np.float32)
             - np.mean(x, axis=(0, 1, 2), dtype=np.float32) ** 2)
    assert np.max(np.abs(var / ref_var - 1)) < 1e-5
    # The float32 E[x^2] - E[x]^2 that this packing avoids is far off here.
    assert np.max(np.abs(naive / ref_var - 1)) > 1e-2


def test_empty_everywhere_gives_zeros_not_nan():
    count, mean, var = merged([np.zeros((0, 3), np.float32)] * 2, -1)
    assert count == 0 and not np.any(mean) and not np.any(var)


def test_local_count_comes_from_the_shape():
    x = tf.zeros([2, 3, 4, 5])
    assert moments.local_count(x, [0, 1, 2]).numpy() == 24


def test_unbiased_variance():
    var = tf.constant([2.0, 4.0], tf.float64)
    np.testing.assert_allclose(moments.unbiased_variance(var, tf.constant(4.0, tf.float64)), [8 / 3, 16 / 3])
    np.testing.assert_allclose(moments.unbiased_variance(var, tf.constant(1.0, tf.float64)), [2.0, 4.0])
