"""dist_bn.training: a data-parallel training job that uses SyncBatchNormalization.

`python -m dist_bn.training CONFIG.yaml [key.path=value ...]` runs it on every
rank (`dist-bn-launch` starts it). One idea per module:

  schema       the job's config sections (model, data, train, run) and their rules
  data         synthetic video clips whose class only motion reveals; sharding
  model        the C3D-style classifier, with sync, local or no batch norm
  schedule     learning rate scaled by the world size, with linear warmup
  rundir       what happens to run.dir (create, refuse, resume, move aside)
  distributed  Horovod start-up, GPU pinning, rank 0's decisions shared
  checkpoint   save on rank 0, restore on resume, damaged checkpoints skipped
  report       progress lines, train.log, metrics.json
  callbacks    the job's Keras callbacks for model.fit, in order
  loop         setup, the compiled model, model.fit
  supervision  a rank under dist-bn-launch: exit code, end with the launcher
"""
