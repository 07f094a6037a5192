"""SAMA-AVS on MS3: as configs/sama_s4.py (the reference uses one recipe for
both), trained on every annotated frame; `train.init_from` an S4 run gives
the reference's "MS3 with S4 warm-up" (`scripts/ms3_train.sh`)."""

from configs import sama_s4


def get_config(arg=None):
  return sama_s4.sama_config('ms3', arg)
