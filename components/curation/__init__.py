"""Image curation on Ray Data: sources, the Terminus filters, LANCZOS-without-upsampling
into SDXL aspect buckets with crop coordinates, crash-safe shards in the ``components.dataset`` layout.

Modules: ``sources`` (directory, s3:// prefix, manifest), ``filters`` (reasons and checks),
``buckets`` (bucket and crop math), ``transforms`` (pixels), ``process`` (one record -> one outcome),
``dedupe`` (exact duplicates, dataset-wide), ``writer`` (shards, publish, _SUCCESS), ``pipeline`` (Ray Data),
``lineage`` (MLflow), ``bench`` (pipeline vs a single-process loop). Import the function you need
from its module; nothing here imports Ray or MLflow at package import.
"""
