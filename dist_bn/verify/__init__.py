"""dist-bn-verify: SyncBatchNormalization checked on the user's own world (see `cli`).

`cases` the catalog, its data and tolerances (pure); `world` Horovod and the
process sets; `run` one case on this rank; `judge` verdicts and the table
(pure); `cli` the command line, also `python -m dist_bn.verify`.
"""
