"""``dat-ds tune``: a recipe's DeepSpeed JSON tuned for this hardware by timing real training steps.

A user feature, like DeepSpeed's ``autotuning/``, and the layer above ``evaluation`` (it builds the runs it
times through ``runtime.Trainer``) and below ``launch`` (how its ranks start is passed in):

- ``search``: the search over micro-batch, ZeRO stage, precision, communication, layout ...; pure (no torch,
  no processes), the measurement is a callable;
- ``measure``: that callable on real ranks (``EngineMeasure``), one live launch per layout;
- ``worker``: what those ranks run (rank entry: ``cli.tune_rank``);
- ``run``: one tune from validated inputs to the tuned JSON, its ``.tuning.json`` sidecar, table and plot.
"""
