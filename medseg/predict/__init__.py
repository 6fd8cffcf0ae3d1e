"""medseg.predict: batch prediction with a MONAI bundle (``medseg predict``).

- :mod:`~medseg.predict.discovery`: which files/folders are cases, their stable ids, fingerprints, shards;
- :mod:`~medseg.predict.engine`: :class:`BatchPredictor`, the pipelined load -> infer -> write engine;
- :mod:`~medseg.predict.state`: done markers and leftovers of killed runs (resuming);
- :mod:`~medseg.predict.report`: ``report.json`` / ``report.csv``, shard merging, exit codes;
- :mod:`~medseg.predict.command`: the ``medseg predict`` command line.
"""

from medseg.predict.discovery import Case, case_id, discover_cases, fingerprint, parse_shard, select_shard
from medseg.predict.engine import FORMATS, BatchPredictor, SetupError, load_checkpoint
from medseg.predict.report import EXIT_CODES, CaseResult, merge_reports, read_report, write_report

__all__ = [
    "EXIT_CODES",
    "FORMATS",
    "BatchPredictor",
    "Case",
    "CaseResult",
    "SetupError",
    "case_id",
    "discover_cases",
    "fingerprint",
    "load_checkpoint",
    "merge_reports",
    "parse_shard",
    "read_report",
    "select_shard",
    "write_report",
]
