"""Broadcasting Keras 3 variables, which Horovod's own helpers reject.

Keras 3 variables wrap a `tf.Variable` (`.value`) instead of being one, so
`hvd.broadcast_variables(model.variables, ...)` fails; passing the wrapped
`tf.Variable`s works and keeps Horovod's grouped broadcast.
"""
import horovod.tensorflow as hvd
import keras


def broadcast_variables(variables, root_rank=0, process_set=hvd.global_process_set):
    """Assigns `root_rank`'s values to `variables` (Keras or TF) on every rank.

    Collective: every rank of the set must call it with the same variables in
    the same order. A no-op without Horovod or with one rank.
    """
    if not hvd.is_initialized() or process_set.size() == 1:
        return
    tf_variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    if tf_variables:
        hvd.broadcast_variables(tf_variables, root_rank, process_set=process_set)


def is_random_state(variable):
    """Whether `variable` is a `keras.random.SeedGenerator`'s state (Dropout's, for one)."""
    return variable.path.split("/")[-1].startswith("seed_generator_state")


def broadcast_global_variables(model, root_rank=0, process_set=hvd.global_process_set):
    """Broadcasts `model`'s variables (random-number states kept per rank) and, if built,
    its optimizer's."""
    variables = [v for v in model.variables if not is_random_state(v)]
    if getattr(model, "optimizer", None) is not None and model.optimizer.built:
        variables += list(model.optimizer.variables)
    broadcast_variables(variables, root_rank, process_set)
