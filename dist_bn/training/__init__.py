"""dist_bn.training: a data-parallel training job that uses SyncBatchNormalization.

`python -m dist_bn.training CONFIG.yaml [key.path=value ...]` runs it on every
rank (`dist-bn-launch` starts it). One idea per module:

  data         synthetic video clips whose class only motion reveals; sharding
  model        the C3D-style classifier, with sync, local or no batch norm
  schedule     learning rate scaled by the world size, with linear warmup
  rundir       what happens to run.dir (create, refuse, resume, move aside)
  distributed  Horovod core ops the loop needs (Keras 3 safe)
  checkpoint   save on rank 0, restore on resume
  report       progress lines, train.log, TensorBoard, metrics.json
  loop         setup, training steps, evaluation, the epoch loop
"""
