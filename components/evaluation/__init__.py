"""Evaluation of a registered version: the numbers promotion is gated on (``run.evaluate_version``).

Modules: ``probe`` (the ZT-SNR dynamic-range probe, NaN and blank checks, grids), ``prompts`` (the
versioned prompt set of the quality metrics), ``quality`` (CLIP score, FID and KID with configurable
metric models), ``run`` (a version against the champion, logged to MLflow). Nothing is imported at
package import.
"""
