"""`evaluate`: `model.evaluate` on each rank's shard, its results exact over all ranks.

Keras gives callbacks a copy of `evaluate`'s logs, so no callback can change
what it returns. This runs `model.evaluate` on this rank's data, then sums
every metric's state variables over ranks and reads the results
(`global_metric_results`), so ranks with different numbers of samples are
weighted by them. Ranks may run different numbers of steps (inference has
no collectives; SyncBatchNormalization uses its moving statistics).
"""
import horovod.tensorflow as hvd

from dist_bn.keras.callbacks import global_metric_results


def evaluate(model, x=None, y=None, return_dict=False, process_set=hvd.global_process_set,
             **kwargs):
    """`model.evaluate(x, y, **kwargs)` with results over all ranks of `process_set`.

    Collective: every rank calls it once. Returns what `model.evaluate`
    returns (a scalar, a list in Keras's order, or with `return_dict` a dict).
    """
    local = model.evaluate(x, y, return_dict=True, **kwargs)
    results = global_metric_results(model, process_set)
    results = {k: results.get(k, v) for k, v in local.items()}
    if return_dict:
        return results
    values = list(results.values())
    return values[0] if len(values) == 1 else values
