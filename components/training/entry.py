"""Ray Train's per-worker entry point, in a module that imports nothing heavy.

Train's controller actor unpickles the function it is given to hand it to the workers; a function pickled
by reference from ``components.training.loop`` made the controller import torch, diffusers and
transformers first, several seconds of every run's start on a small machine. Only the workers import the
loop, when they call it.
"""

from __future__ import annotations


def train_loop_per_worker(loop_config: dict) -> None:
    # imported in the Ray Train worker's process: the driver ships this function without loading torch
    from components.training.loop import train_loop_per_worker as loop

    loop(loop_config)
