"""Imported before torch by every entry point: OpenMP threads that sleep at barriers instead of spinning.

A training or decoding step runs hundreds of small ops, each an OpenMP parallel region that ends in a
barrier. By default (OMP_WAIT_POLICY unset, i.e. active) a thread that reaches the barrier first spins;
when another process holds the other core, the spinning thread burns the time its partner needs and every
barrier costs a scheduler tick. Measured on the 2-core machine with other jobs running (beam 5 at the
paper's dimensions): 1.3-1.9 images/s with 2 spinning threads, 8.2 with PASSIVE, 9.4 with one thread.
PASSIVE makes waiting threads sleep. libgomp reads the variable once, when torch loads it, so this
module must be imported before torch; a value the user set is kept.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
