"""The record of a comparison: models side by side over seeds, with paired significance tests.

Every number comes from RecBole: the table's metrics are its evaluator's results, and per-user values
(for tests and slices) come from its metric classes applied to its ``rec.topk`` rows
(``metrics.per_user_metrics``), so they average to the same numbers.

Files that ``write_comparison`` writes under its ``output_dir``:

* ``runs/<model>-seed<seed>/``: each run's record (``records.save_record``), so runs made by separate
  processes can be merged later with ``python -m recbole_mllm.comparison RUN_DIR ... --output=DIR``.
* ``comparison.csv`` and the main table of ``comparison.md``: one row per (model, protocol); each
  metric as its mean over seeds and ``<metric>_std`` (ddof=1, 0 for one seed; Markdown shows
  ``mean ± std``), ``seeds``, then ``reference``, ``delta``, ``p_value``, the mean ``epochs`` and
  ``train_seconds``, the largest ``peak_gpu_memory_gb`` and ``candidates`` (the protocol's
  fingerprints, ``/``-joined when they differ by seed, as uni100 candidates do).
* ``comparison_slices.csv`` and the second table: one row per (model, protocol, slice) with the
  slice's definition, its ``users``, each per-user metric's mean and std over seeds of the slice
  mean, and ``reference``, ``delta``, ``p_value`` on the slice's users.
* ``comparison_pvalues.csv`` and the table ``Against every baseline``: one row per (model, protocol,
  reference) for every baseline of the protocol (and, for a first stage, its own model): ``delta`` and
  ``p_value`` as below.
* ``comparison_phases.csv`` and the table ``Wall time per phase``: one row per model, the mean over its runs of
  each phase's seconds (the records' ``phase_seconds``: dataset, stages, warm-up, training, validation, tests...).
* ``runs.csv``: one row per run and protocol, before averaging; ``comparison.png``: bars of the means.

Rows: runs are grouped by ``label`` (``run_label``, else the model's name); runs under one label whose
``hyper_parameters`` differ get the differing ``key=value`` pairs appended to it, so unlike runs are never
averaged together; two runs of one row at one seed are refused (``ComparisonError``).

References: every row of the main tables is compared with the best baseline of its protocol (the model,
not from recbole_mllm, with the best mean validation score ``best_valid_score``, never a test score; the
best model when no baseline ran), except a ``<model> (first stage)`` row (MLLMSRec's first stage scoring
the same checkpoint alone), whose reference is ``<model>``: its delta is minus what the LLM reranker adds.
``delta`` = row mean minus reference mean of the valid metric. ``p_value``: two-sided Wilcoxon
signed-rank test on that metric per user, users paired by ``user_id``, each user's value first averaged
over the seeds both models ran; blank without per-user data or a common seed. The reference row has
no reference. Results without ``seed`` or ``per_user`` (older callers) count as seed 0 and get
no p-values or slices.

Runs of one seed tested on different candidates (``fingerprints``) are refused with a ``ComparisonError``
naming them and their hashes; ``descriptive=True`` (``--descriptive``) writes the tables without any
reference, delta or p-value, and ``comparison.md`` says why.
"""

from recbole_mllm.comparison.analysis import default_slices
from recbole_mllm.comparison.metrics import per_user_metrics
from recbole_mllm.comparison.records import find_records, load_record, save_record
from recbole_mllm.comparison.report import write_comparison

__all__ = ["default_slices", "find_records", "load_record", "per_user_metrics", "save_record", "write_comparison"]
