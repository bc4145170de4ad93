"""Imported before torch by every entry point: OpenMP threads that sleep at barriers instead of spinning.

A training or decoding step runs hundreds of small ops, each an OpenMP parallel region ending in a
barrier. With OpenMP's default (active waiting), a thread that reaches the barrier first spins; when
another process wants the same cores, the spinning thread burns the time its partner needs. Measured on
the 2-core machine (benchmark.py's shared-CPU rows, the table in docs/speed.md): the demo's training step
beside one busy process of the same priority took 2.98x as long as alone with spinning threads and 1.59x
with sleeping ones (OMP_WAIT_POLICY=PASSIVE). The price on a quiet machine: the demo step runs at 0.86x
the speed (docs/speed.md gives the other cases). Set OMP_WAIT_POLICY=ACTIVE yourself on a machine you
have to yourself: a value already set is kept. libgomp reads the variable once, when torch loads it, so
this module must be imported before torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
