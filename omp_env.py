"""Imported before torch by every entry point: OpenMP threads that sleep at barriers instead of spinning.

A training or decoding step runs hundreds of small ops, each an OpenMP parallel region ending in a
barrier. With OpenMP's default (active waiting), a thread that reaches the barrier first spins; when
another process wants the same cores, the spinning thread burns the time its partner needs. Measured on
the 2-core machine (benchmark.py's shared-CPU rows, 2026-11-26): the demo's training step beside one
busy process of the same priority took 2.75x as long as alone with spinning threads and 1.61x with
sleeping ones (OMP_WAIT_POLICY=PASSIVE); under a mix of several jobs, beam search fell from 8-9 to
1.3-1.9 images/s with spinning threads. The price on a quiet machine: the demo step runs at 0.86x the
speed, beam search at ~0.85x, tiny test-sized models at ~0.4x. Set OMP_WAIT_POLICY=ACTIVE yourself on
a machine you have to yourself: a value already set is kept. libgomp reads the variable once, when
torch loads it, so this module must be imported before torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
